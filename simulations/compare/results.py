"""Read a comparison's runs back into tables (CSV, Markdown) and plots (PNG)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from simulations.compare.runner import RunSpec  # noqa: E402
from simulations.compare.settings import SETTINGS  # noqa: E402

METRICS = ("zero_shot_accuracy", "recall_at_1", "tpr", "fpr", "epsilon_lower_bound")


def run_row(run: RunSpec) -> dict:
    """The final round of one run."""
    attack = pd.read_csv(run.folder / "attack.csv").iloc[-1]
    utility = pd.read_csv(run.folder / "utility.csv").iloc[-1]
    rounds = pd.read_csv(run.folder / "rounds.csv")
    config = json.loads((run.folder / "config.json").read_text())
    site_level = run.folder / "site_level.json"
    setting = SETTINGS[run.setting]
    local_eps = float(rounds.loc[rounds["round"] == rounds["round"].max(), "epsilon"].max())
    return {
        "setting": run.setting, "target_epsilon": run.epsilon if run.epsilon is not None else math.inf,
        "seed": run.seed, "unit": setting.unit, "relation": setting.relation,
        "epsilon_local": local_eps,
        "epsilon_site": json.loads(site_level.read_text())["epsilon"] if site_level.is_file() else math.nan,
        "noise_multiplier": config["resolved-noise-multiplier"],
        "site_noise_multiplier": config.get("resolved-site-noise-multiplier", 0.0),
        "rounds": int(utility["round"]),
        "sites": int(rounds["site"].nunique()),
        **{m: float(utility[m]) if m in utility else float(attack[m]) for m in METRICS},
    }


def collect(runs: Sequence[RunSpec]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-run rows, and per (setting, target epsilon) mean and spread over seeds."""
    rows = pd.DataFrame([run_row(r) for r in runs])
    keys = ["setting", "target_epsilon", "unit", "relation"]
    agg = rows.groupby(keys, sort=False).agg(
        seeds=("seed", "count"), epsilon_local=("epsilon_local", "mean"), epsilon_site=("epsilon_site", "mean"),
        noise_multiplier=("noise_multiplier", "mean"), site_noise_multiplier=("site_noise_multiplier", "mean"),
        sites=("sites", "first"),
        **{f"{m}_mean": (m, "mean") for m in METRICS}, **{f"{m}_std": (m, "std") for m in METRICS},
    ).reset_index()
    # client-level noise on the averaged update, in units of one site's clipped update (S)
    agg["site_noise_on_average"] = agg["site_noise_multiplier"] / agg["sites"]
    return rows, agg


def _eps(value: float) -> str:
    return "-" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.2f}")


def markdown_table(agg: pd.DataFrame) -> str:
    head = ("| setting | target epsilon | unit (what epsilon is about) | epsilon (local) | epsilon (site) | "
            "noise multiplier: local / site (site noise on the average, x S) | "
            "zero-shot acc | IDIA TPR | IDIA FPR | empirical eps lower bound | seeds |")
    lines = [head, "|" + "---|" * 11]
    for r in agg.itertuples():
        pm = lambda m: f"{getattr(r, m + '_mean'):.3f} ± {0.0 if math.isnan(getattr(r, m + '_std')) else getattr(r, m + '_std'):.3f}"  # noqa: E731
        site_noise = f"{r.site_noise_multiplier:.2f} ({r.site_noise_on_average:.2f})" if r.site_noise_multiplier else "-"
        local_noise = f"{r.noise_multiplier:.2f}" if r.noise_multiplier else "-"
        lines.append(f"| {r.setting} | {_eps(r.target_epsilon)} | {r.unit} | {_eps(r.epsilon_local)} | "
                     f"{_eps(r.epsilon_site)} | {local_noise} / {site_noise} | {pm('zero_shot_accuracy')} | {pm('tpr')} | {pm('fpr')} | "
                     f"{pm('epsilon_lower_bound')} | {r.seeds} |")
    return "\n".join(lines) + "\n"


def plot_against_epsilon(agg: pd.DataFrame, metric: str, ylabel: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    private = agg[agg["target_epsilon"].apply(math.isfinite)]
    for name, g in private.groupby("setting", sort=False):
        g = g.sort_values("target_epsilon")
        ax.errorbar(g["target_epsilon"], g[f"{metric}_mean"], yerr=g[f"{metric}_std"].fillna(0), marker="o",
                    capsize=3, label=f"{name} ({SETTINGS[name].unit})")
    for name, g in agg[~agg["target_epsilon"].apply(math.isfinite)].groupby("setting", sort=False):
        ax.axhline(g[f"{metric}_mean"].iloc[0], linestyle="--", color="grey" if "pooled" in name else "black",
                   label=f"{name} (no DP)")
    ax.set_xscale("log")
    ticks = sorted(set(private["target_epsilon"]))
    if ticks:
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.set(xlabel="target epsilon (per the setting's unit; log scale)", ylabel=ylabel, ylim=(-0.02, 1.02))
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(out_dir: str | Path, runs: Sequence[RunSpec]) -> dict[str, Path]:
    out = Path(out_dir)
    rows, agg = collect(runs)
    paths = {"runs": out / "runs.csv", "table": out / "table.csv", "markdown": out / "table.md"}
    rows.to_csv(paths["runs"], index=False)
    agg.to_csv(paths["table"], index=False)
    paths["markdown"].write_text(markdown_table(agg))
    paths["utility_plot"] = plot_against_epsilon(agg, "zero_shot_accuracy", "zero-shot accuracy (held-out)",
                                                 out / "utility_vs_epsilon.png")
    paths["attack_plot"] = plot_against_epsilon(agg, "tpr", "IDIA TPR", out / "tpr_vs_epsilon.png")
    return paths
