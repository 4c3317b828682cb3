"""How fast non-private fine-tuning teaches the model its patients' names: one site, or FedAvg.

    python -m benchmarks.idia_leak [--patients 250] [--trainable all] [--lr 5e-4] [--chunks 4]
                                   [--steps 120] [--names census] [--identity-strength 1.5] [--sites 1]
                                   [--rows-by-site] [--replies] [--out runs/bench_leak]

One synthetic site (plus public and held-out populations), the cached warm start, then
non-private ``train_local`` (record sampling, q 0.1) in chunks of ``--steps`` steps; after each
chunk, held-out zero-shot accuracy and the identity inference attack (members: the site's
patients, queried with images never trained on; non-members: held-out patients). ``--names census``
names the patients from the 1,000-surname lists (``fedclip.data.names``); compare the two, and
the federated runs, where FedAvg over sites dilutes each site's binding.

``--sites N`` (N > 1): N sites of ``--patients`` each, averaged in process (no Flower, no Ray: the
quick way to try an aggregation); each chunk is a round in which every site trains ``--steps``
steps from the global model and the server takes the mean of the sites' models (equal sizes,
equal weights). ``--rows-by-site`` averages each token-embedding row only over the sites whose
captions hold that token (a row only one site trains keeps that site's full update; FedAvg
divides it by N), everything else as FedAvg. ``--replies`` also attacks each site's own model
after its local steps, as the server sees it (``fedclip.attacks.replies``: a person is a member if
any site's model names them).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fedclip.data.names import DEFAULT_NAME_LISTS, NAME_LISTS


def average(
    base: dict[str, torch.Tensor],
    models: list[dict[str, torch.Tensor]],
    *,
    rows: dict[str, list[torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """The mean of ``models``; for a key in ``rows`` (one boolean row mask per model: the rows that
    model trained), each row is the mean over the models that trained it (``base`` where none did)."""
    out = {}
    for key, value in base.items():
        stack = torch.stack([m[key] for m in models])
        if not value.is_floating_point():
            out[key] = value
        elif rows and key in rows:
            held = torch.stack(rows[key]).to(value.dtype)[:, :, None]  # [models, rows, 1]
            count = held.sum(0)
            out[key] = torch.where(count > 0, ((stack - value) * held).sum(0) / count.clamp(min=1) + value, value)
        else:
            out[key] = stack.mean(0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.idia_leak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--patients", type=int, default=250)
    p.add_argument("--trainable", default="all")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--names", choices=NAME_LISTS, default=DEFAULT_NAME_LISTS, help="name lists of the patients")
    p.add_argument("--sites", type=int, default=1, help="N > 1: FedAvg over N sites, in process")
    p.add_argument(
        "--rows-by-site", action="store_true", help="average token-embedding rows over the sites that hold the token"
    )
    p.add_argument(
        "--replies", action="store_true", help="also attack each site's model before averaging (the server's view)"
    )
    p.add_argument(
        "--identity-strength", type=float, default=None, help="weight of a patient's look (data default if unset)"
    )
    p.add_argument("--out", default="runs/bench_leak")
    args = p.parse_args(argv)
    if args.sites < 1 or ((args.rows_by_site or args.replies) and args.sites == 1):
        p.error("--sites: expected >= 1; --rows-by-site and --replies need --sites > 1")

    import copy

    from benchmarks.setup import prepare
    from fedclip.attacks.idia import IdentityInferenceAttack, IdiaConfig, IdiaTargets
    from fedclip.attacks.metrics import membership_metrics
    from fedclip.attacks.replies import ReplyAttack
    from fedclip.data.manifest import load_manifest
    from fedclip.models.arrays import model_to_arrays
    from fedclip.models.factory import ModelConfig, create_model
    from fedclip.training.config import DpConfig, TrainConfig
    from fedclip.training.local import train_local

    out = Path(args.out)
    data = {} if args.identity_strength is None else {"identity_strength": args.identity_strength}
    bench = prepare(out, num_sites=args.sites, patients_per_site=args.patients, name_lists=args.names, **data)
    frame = load_manifest(out / "data" / "manifest.csv").frame
    bundle = create_model(ModelConfig(pretrained=str(bench.checkpoint)))
    idia = IdiaConfig(name_lists=args.names)
    attack = IdentityInferenceAttack(
        IdiaTargets.from_frame(frame, config=idia, preprocess=bundle.preprocess),
        tokenizer=bundle.tokenizer,
        config=idia,
    )
    model = bench.model(args.trainable)
    replies = ReplyAttack(attack, model=model, when=lambda r: True) if args.replies else None
    sites = [bench.sites[s] for s in sorted(bench.sites)]
    vocab = model.token_embedding.weight.shape[0]
    held = [torch.zeros(vocab, dtype=torch.bool).index_fill_(0, data.tokens.unique(), True) for data in sites]
    rows = {"token_embedding.weight": held} if args.rows_by_site else None
    started = time.time()
    what = "one site" if args.sites == 1 else f"FedAvg over {args.sites} sites{' (rows by site)' if rows else ''}"
    print(f"warm start: zero-shot {bench.warm:.3f}; {what}")
    for chunk in range(1, args.chunks + 1):
        base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        trained = []
        for i, data in enumerate(sites):
            local = copy.deepcopy(model) if args.sites > 1 else model
            dp = DpConfig(mode="nonprivate", privacy_unit="record", sample_rate=0.1, declared_units=len(data))
            train_local(
                local, data, dp=dp, train=TrainConfig(steps=args.steps, lr=args.lr), reproducible_seed=chunk * 100 + i
            )
            trained.append({k: v.detach() for k, v in local.state_dict().items()})
            if replies is not None:
                replies.observe(chunk, f"site_{i}", model_to_arrays(local))
        if args.sites > 1:
            model.load_state_dict(average(base, trained, rows=rows))
        m = membership_metrics(attack(model).frame, delta=1e-5)
        tpr, fpr = m["tpr"], m["fpr"]
        on_replies = ""
        if replies is not None:
            r = membership_metrics(replies.decisions(chunk).frame, delta=1e-5)
            on_replies = f", on the sites' models TPR {r['tpr']:.3f} FPR {r['fpr']:.3f}"
        done = f"{chunk * args.steps} steps" if args.sites == 1 else f"round {chunk} ({args.steps} local steps)"
        print(
            f"{args.names} names, {args.trainable} lr {args.lr:g}, {done}: zero-shot {bench.accuracy(model):.3f}, "
            f"IDIA TPR {tpr:.3f} FPR {fpr:.3f}{on_replies} ({time.time() - started:.0f}s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
