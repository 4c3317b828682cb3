"""Why pooled central DP can end below federated DP: the optimizer on pure-noise coordinates.

    python -m benchmarks.pooled_gap [--patients-per-site 250] [--sites 4] [--rounds 4] [--steps 30]
                                    [--epsilon 4] [--mode microbatch] [--out runs/bench_pooled_gap]

The same patients are trained either pooled at one site or split over ``--sites`` sites whose
models are averaged after every round (FedAvg with equal weights), with the same sample rate,
steps and noise multiplier, so every patient has the same epsilon in both. For each optimizer
and trainable set it prints held-out zero-shot accuracy and the RMS drift of the token-embedding
rows whose tokens occur in no training caption: their gradient is zero, so every change there is
the DP noise, normalised by Adam into steps of about ``lr`` whatever the noise's size. Averaging
over sites cancels part of that drift; pooling does not.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

ARMS = (("all", "adamw", 2e-3), ("all", "sgd", 0.02), ("last-1", "adamw", 5e-3))


def pure_noise_rows(tokens: list[torch.Tensor], vocab: int) -> torch.Tensor:
    """Token-embedding rows that no training caption uses (their gradient is exactly zero)."""
    used = torch.zeros(vocab, dtype=torch.bool)
    for t in tokens:
        used[t.flatten().unique()] = True
    return ~used


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.pooled_gap",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--patients-per-site", type=int, default=250)
    p.add_argument("--sites", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--epsilon", type=float, default=4.0)
    p.add_argument("--sample-rate", type=float, default=0.1)
    p.add_argument("--mode", default="microbatch")
    p.add_argument("--out", default="runs/bench_pooled_gap")
    args = p.parse_args(argv)

    from benchmarks.setup import calibrated, prepare
    from fedclip.data.tensors import PairData
    from fedclip.training.config import DpConfig, TrainConfig
    from fedclip.training.local import train_local

    out = Path(args.out)
    bench = prepare(out, num_sites=args.sites, patients_per_site=args.patients_per_site)
    sites = list(bench.sites.values())
    pooled = PairData(
        images=torch.cat([s.images for s in sites]),
        tokens=torch.cat([s.tokens for s in sites]),
        **{k: sum((getattr(s, k) for s in sites), ()) for k in ("patient_ids", "names", "conditions", "record_ids")},
    )

    def dp(units: int, sigma: float) -> DpConfig:
        return DpConfig(mode=args.mode, noise_multiplier=sigma, sample_rate=args.sample_rate, declared_units=units)

    # the same sigma for the pooled site and every site: same q, steps and relation, so the same epsilon
    sigma = calibrated(
        dp(args.patients_per_site, 1.0), epsilon=args.epsilon, steps=args.rounds * args.steps
    ).noise_multiplier
    rows = []
    for trainable, optimizer, lr in ARMS:
        train = TrainConfig(steps=args.steps, lr=lr, optimizer=optimizer)
        for layout in ("pooled", "federated"):
            started = time.time()
            model = bench.model(trainable)
            start = {k: v.clone() for k, v in model.state_dict().items()}
            parts = [pooled] if layout == "pooled" else sites
            global_state = start
            for round_ in range(args.rounds):
                states = []
                for k, part in enumerate(parts):
                    model.load_state_dict(global_state)
                    train_local(
                        model,
                        part,
                        dp=dp(len(set(part.patient_ids)), sigma),
                        train=train,
                        reproducible_seed=1000 * round_ + k,
                        public=bench.public,
                    )
                    states.append({n: v.detach().clone() for n, v in model.state_dict().items()})
                global_state = {
                    n: torch.stack([s[n].float() for s in states]).mean(0).to(states[0][n].dtype) for n in states[0]
                }
            model.load_state_dict(global_state)
            emb = "token_embedding.weight"
            noise_rows = pure_noise_rows([s.tokens for s in sites], start[emb].shape[0])
            drift = (global_state[emb] - start[emb])[noise_rows].pow(2).mean().sqrt().item()
            rows.append(
                {
                    "trainable": trainable,
                    "optimizer": f"{optimizer} lr {lr:g}",
                    "layout": layout,
                    "zero_shot": bench.accuracy(model),
                    "pure_noise_drift_rms": drift,
                    "seconds": time.time() - started,
                }
            )
            print(
                " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()),
                flush=True,
            )
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "pooled_gap.csv", index=False)
    print(
        f"\n{args.mode} mode, identity epsilon {args.epsilon} (sigma {sigma:.2f}), {args.sites} x "
        f"{args.patients_per_site} patients, {args.rounds} rounds x {args.steps} steps; warm start {bench.warm:.3f}\n"
    )
    print(table.round(4).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
