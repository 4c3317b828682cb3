"""Tuned with its cost charged, against the hand-chosen defaults at the same total epsilon.

    python -m benchmarks.tuning_cost [--epsilons 4 8] [--seeds 0 1 2]
                                     [--config simulations/tune/default.toml] [--out runs/bench_tuning_cost]
                                     [--parallel 2]

For each epsilon and seed: ``fedclip tune``'s search (its released model at that epsilon per site,
the search included) and one run of the app's DP defaults at the same target epsilon, on the same
data, warm start, rounds and steps, both scored on the same test patients (the held-out patients
outside the search's validation set). The defaults were chosen on this data by
``benchmarks/dp_utility.py``; that choice is not in their epsilon.

To say what the search's charge costs, apart from what it finds, a third run per cell trains the
point the search selected at the full target epsilon with the search NOT charged (a figure for the
decomposition only, never a private result): search cost = that run's accuracy minus the tuned
model's; what tuning found = that run's accuracy minus the defaults'. ``candidate_epsilon`` is what
one candidate run at the search's noise would cost alone. Everything is resumable: a finished
search or run is read back.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd


@dataclass(frozen=True)
class DefaultRun:
    folder: Path
    overrides: dict[str, Any]
    label: str


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.tuning_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--epsilons", type=float, nargs="+", default=[4.0, 8.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--config", default="simulations/tune/default.toml")
    p.add_argument("--out", default="runs/bench_tuning_cost")
    p.add_argument(
        "--parallel", type=int, default=2, help="(epsilon, seed) cells at once (each gets its share of the cores)"
    )
    args = p.parse_args(argv)
    if args.parallel < 1:
        p.error(f"--parallel: expected at least 1 cell at once, got {args.parallel}")

    from simulations.launch import execute, is_done
    from simulations.tune.config import TuneConfig
    from simulations.tune.search import run_search

    template = TuneConfig.from_toml(args.config)
    out = Path(args.out)

    def cell(eps: float, seed: int) -> dict[str, Any]:
        where = out / f"eps={eps:g}" / f"seed={seed}"
        # the budget a site's ledger allows must admit the search's epsilon
        base = {**template.base, "seed": seed, "cache-dir": str(out / "cache"), "budget": eps}
        search = replace(template, target_epsilon=eps, base=base, output_dir=str(where / "tune"))
        run_search(search, workers=args.parallel)
        chosen = json.loads((where / "tune" / "selected.json").read_text())
        default = DefaultRun(
            where / "default",
            {
                **base,
                "target-epsilon": eps,
                "validation-patients": template.validation_patients,
                "output-dir": str(where / "default"),
            },
            f"defaults eps={eps:g} seed={seed}",
        )
        if not is_done(default):
            execute(default, workers=args.parallel)
        best = chosen["selected"] or {}
        point = {k: best[k] for k in template.space if k in best}
        uncharged = DefaultRun(
            where / "selected-uncharged",
            {**default.overrides, **point, "output-dir": str(where / "selected-uncharged")},
            f"selected point, search not charged, eps={eps:g} seed={seed}",
        )
        if best and not is_done(uncharged):
            execute(uncharged, workers=args.parallel)
        config = json.loads((default.folder / "config.json").read_text())
        rounds = pd.read_csv(default.folder / "rounds.csv")
        alone = pd.read_csv(Path(best["folder"]) / "rounds.csv") if best else None
        row = {
            "epsilon": eps,
            "seed": seed,
            "candidates": len(json.loads((where / "tune" / "state" / "search.json").read_text())["candidates"]),
            "tuned_point": ", ".join(f"{k}={v}" for k, v in point.items()),
            "tuned_noise": chosen["noise_multiplier"],
            "tuned_test_accuracy": best.get("test_zero_shot_accuracy", float("nan")),
            "tuned_epsilon_released": max(chosen["epsilon"]["released-model"].values()),
            "tuned_epsilon_server": max(chosen["epsilon"]["server"].values(), default=0.0),
            "candidate_epsilon": float(alone["epsilon"].max()) if alone is not None else float("nan"),
            "uncharged_test_accuracy": _final_accuracy(uncharged.folder) if best else float("nan"),
            "default_noise": config["resolved-noise-multiplier"],
            "default_test_accuracy": _final_accuracy(default.folder),
            "default_epsilon": float(rounds["epsilon"].max()),
        }
        print(row, flush=True)
        return row

    # independent (epsilon, seed) cells share the machine; each search runs its candidates in turn
    cells = [(eps, seed) for eps in args.epsilons for seed in args.seeds]
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        rows = list(pool.map(lambda c: cell(*c), cells))
    table = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "tuning_cost.csv", index=False)
    print(table.round(3).to_string(index=False))
    print(f"plot: {plot(table, out / 'tuning_cost.png')}")
    for eps, g in table.groupby("epsilon"):
        wins = int((g["tuned_test_accuracy"] >= g["default_test_accuracy"]).sum())
        gap = (g["tuned_test_accuracy"] - g["default_test_accuracy"]).mean()
        cost = (g["uncharged_test_accuracy"] - g["tuned_test_accuracy"]).mean()
        found = (g["uncharged_test_accuracy"] - g["default_test_accuracy"]).mean()
        print(
            f"epsilon {eps:g}: tuned at least as accurate on {wins} of {len(g)} seeds; mean difference {gap:+.3f} "
            f"(the search's charge costs {cost:+.3f}; the selected point, uncharged, against the defaults {found:+.3f})"
        )
    return 0


def plot(table: pd.DataFrame, path: Path) -> Path:
    """Test zero-shot accuracy per (epsilon, seed): defaults, tuned with the search charged, and the
    selected point with the search not charged (the decomposition's reference, not a private result)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    bars = [
        ("default_test_accuracy", "defaults (their choice not charged)"),
        ("tuned_test_accuracy", "tuned (search charged)"),
        ("uncharged_test_accuracy", "selected point (search NOT charged)"),
    ]
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    x = range(len(table))
    for i, (column, label) in enumerate(bars):
        ax.bar([j + (i - 1) * 0.27 for j in x], table[column], width=0.27, label=label)
    ax.set_xticks(
        list(x), [f"eps {e:g}\nseed {s}\nK = {k}" for e, s, k in zip(table.epsilon, table.seed, table.candidates)]
    )
    values = table[[c for c, _ in bars]]
    ax.set_ylim(max(0.0, float(values.min().min()) - 0.05), float(values.max().max()) + 0.04)
    ax.set_ylabel("test zero-shot accuracy")
    ax.set_title("Tuning at equal total epsilon per site (released model's figure)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _final_accuracy(folder: Path) -> float:
    """The last round's zero-shot accuracy on the test patients (the validation set's complement)."""
    return float(pd.read_csv(folder / "utility.csv").iloc[-1]["zero_shot_accuracy"])


if __name__ == "__main__":
    raise SystemExit(main())
