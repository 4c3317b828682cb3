"""Utility of one site's DP fine-tuning at a fixed epsilon, for choosing DP-aware defaults.

    python -m benchmarks.dp_utility [--patients 300] [--epsilon 4] [--steps 120] [--seeds 2]
                                    [--out runs/bench_utility]

One synthetic site of ``--patients`` patients (plus the public and held-out populations), the
cached warm start, then ``train_local`` under each configuration with the noise calibrated to
``--epsilon`` (identity level, delta 1e-5) over ``--steps`` steps. Prints zero-shot accuracy on
held-out patients (mean over seeds) against the warm start and a non-private run, and the share
of the non-private gain that each DP configuration keeps; writes ``utility.csv``.

Choosing hyperparameters by looking at results on private data costs privacy too; this script
runs on synthetic data, and a deployment should fix its settings on public or synthetic data.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


@dataclass(frozen=True)
class Candidate:
    label: str
    mode: str
    trainable: str
    lr: float
    microbatch_size: int = 1
    sample_rate: float = 0.1


CANDIDATES = (
    Candidate("microbatch m=5, last-1", "microbatch", "last-1", 2e-3, microbatch_size=5, sample_rate=0.5),
    Candidate("microbatch m=1, projections", "microbatch", "projections", 2e-3),
    Candidate("microbatch m=1, last-1", "microbatch", "last-1", 1e-3),
    Candidate("unit, projections", "unit", "projections", 2e-3),
    Candidate("unit, last-1", "unit", "last-1", 1e-3),
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.dp_utility", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=300)
    p.add_argument("--epsilon", type=float, default=4.0)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--out", default="runs/bench_utility")
    args = p.parse_args(argv)

    from fedclip.data.manifest import load_manifest
    from fedclip.data.schema import Split
    from fedclip.data.synthetic import SyntheticConfig, generate
    from fedclip.data.tensors import load_pairs
    from fedclip.evaluation.zero_shot import zero_shot_accuracy
    from fedclip.models.factory import ModelConfig, create_model
    from fedclip.privacy.calibration import calibrate_noise_multiplier
    from fedclip.training.config import DpConfig, TrainConfig
    from fedclip.training.local import train_local
    from fedclip.training.warmstart import WarmStartConfig, warm_start

    out = Path(args.out)
    manifest = generate(out / "data", SyntheticConfig(num_sites=1, patients_per_site=args.patients))
    checkpoint = warm_start(manifest, cache_dir=out / "cache", config=WarmStartConfig())
    frame = load_manifest(manifest)
    bundle = create_model(ModelConfig(pretrained=str(checkpoint)))
    pairs = lambda rows: load_pairs(rows, preprocess=bundle.preprocess, tokenizer=bundle.tokenizer)  # noqa: E731
    train, public, test = pairs(frame.rows(Split.TRAIN)), pairs(frame.rows(Split.PUBLIC)), pairs(frame.rows(Split.HELDOUT))
    warm = zero_shot_accuracy(bundle.model, bundle.tokenizer, test)

    def run(c: Candidate, seed: int, private: bool) -> float:
        model = create_model(ModelConfig(pretrained=str(checkpoint), trainable=c.trainable)).model
        mode = c.mode if private else "nonprivate"
        dp = DpConfig(mode=mode, noise_multiplier=1.0, sample_rate=c.sample_rate, microbatch_size=c.microbatch_size,
                      declared_units=args.patients)
        if private:
            sigma = calibrate_noise_multiplier(target_epsilon=args.epsilon, delta=dp.delta, sample_rate=c.sample_rate,
                                               steps=args.steps, relation=dp.relation, sensitivity=dp.sensitivity)
            dp = DpConfig(mode=mode, noise_multiplier=sigma, sample_rate=c.sample_rate,
                          microbatch_size=c.microbatch_size, declared_units=args.patients)
        train_local(model, train, dp=dp, train=TrainConfig(steps=args.steps, lr=c.lr), reproducible_seed=seed,
                    public=public)
        return zero_shot_accuracy(model, bundle.tokenizer, test)

    rows = []
    for c in CANDIDATES:
        for private in (False, True):
            scores = [run(c, seed, private) for seed in range(args.seeds)]
            rows.append({"config": c.label, "private": private, "zero_shot": sum(scores) / len(scores)})
            print(f"{c.label:32s} {'DP' if private else 'non-private':12s} zero-shot {rows[-1]['zero_shot']:.3f}",
                  flush=True)
    table = pd.DataFrame(rows).pivot(index="config", columns="private", values="zero_shot")
    table.columns = ["nonprivate", "dp"]
    table["warm_start"] = warm
    gain = table["nonprivate"] - warm
    table["kept_share_of_gain"] = ((table["dp"] - warm) / gain).where(gain > 0, math.nan)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "utility.csv")
    print(f"\nepsilon {args.epsilon} (identity, delta 1e-5), {args.patients} patients, {args.steps} steps, "
          f"{args.seeds} seeds; warm start {warm:.3f}\n")
    print(table.round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
