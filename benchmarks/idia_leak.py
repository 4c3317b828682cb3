"""How fast one site's non-private fine-tuning teaches the model its patients' names.

    python -m benchmarks.idia_leak [--patients 250] [--trainable all] [--lr 5e-4] [--chunks 4]
                                   [--steps 120] [--names short]
                                   [--out runs/bench_leak]

One synthetic site (plus public and held-out populations), the cached warm start, then
non-private ``train_local`` (record sampling, q 0.1) in chunks of ``--steps`` steps; after each
chunk, held-out zero-shot accuracy and the identity inference attack (members: the site's
patients, queried with images never trained on; non-members: held-out patients). ``--names census``
names the patients from the 1,000-surname lists (``fedclip.data.names``); compare the two, and
the federated runs, where FedAvg over sites dilutes each site's binding.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fedclip.data.names import DEFAULT_NAME_LISTS, NAME_LISTS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.idia_leak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=250)
    p.add_argument("--trainable", default="all")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--names", choices=NAME_LISTS, default=DEFAULT_NAME_LISTS, help="name lists of the patients")
    p.add_argument("--out", default="runs/bench_leak")
    args = p.parse_args(argv)

    from benchmarks.setup import prepare
    from fedclip.attacks.idia import IdentityInferenceAttack, IdiaConfig, IdiaTargets
    from fedclip.data.manifest import load_manifest
    from fedclip.models.factory import ModelConfig, create_model
    from fedclip.training.config import DpConfig, TrainConfig
    from fedclip.training.local import train_local

    out = Path(args.out)
    bench = prepare(out, num_sites=1, patients_per_site=args.patients, name_lists=args.names)
    frame = load_manifest(out / "data" / "manifest.csv").frame
    bundle = create_model(ModelConfig(pretrained=str(bench.checkpoint)))
    idia = IdiaConfig(name_lists=args.names)
    attack = IdentityInferenceAttack(IdiaTargets.from_frame(frame, config=idia, preprocess=bundle.preprocess),
                                     tokenizer=bundle.tokenizer, config=idia)
    (train,) = bench.sites.values()
    model = bench.model(args.trainable)
    dp = DpConfig(mode="nonprivate", privacy_unit="record", sample_rate=0.1, declared_units=len(train))
    started = time.time()
    print(f"warm start: zero-shot {bench.warm:.3f}")
    for chunk in range(1, args.chunks + 1):
        train_local(model, train, dp=dp, train=TrainConfig(steps=args.steps, lr=args.lr), reproducible_seed=chunk)
        f = attack(model).frame
        tpr, fpr = f[f.is_member].predicted_member.mean(), f[~f.is_member].predicted_member.mean()
        print(f"{args.names} names, {args.trainable} lr {args.lr:g}, {chunk * args.steps} steps: zero-shot {bench.accuracy(model):.3f}, "
              f"IDIA TPR {tpr:.3f} FPR {fpr:.3f} ({time.time() - started:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
