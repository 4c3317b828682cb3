"""PNG plots of a run: epsilon per site, attack rates, and utility, each against the round."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def plot_run(out_dir: str | Path, rounds: pd.DataFrame, attack: pd.DataFrame, utility: pd.DataFrame) -> list[Path]:
    out = Path(out_dir)
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for site, g in rounds.groupby("site"):
        ax.plot(g["round"], g["epsilon"], marker="o", label=site)
    finite = rounds.loc[rounds["budget"] != float("inf"), "budget"] if "budget" in rounds else pd.Series(dtype=float)
    for b in sorted(set(finite)):
        ax.axhline(b, color="grey", linestyle="--", linewidth=0.8)
    ax.set(xlabel="round", ylabel="epsilon (accountant, total so far)", title="Privacy spent per site")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "epsilon.png"))

    if len(attack):  # a deployment without an auditor on the server attacks nothing during the run
        paths.append(plot_attack(out, attack))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(utility["round"], utility["zero_shot_accuracy"], marker="o", label="zero-shot accuracy")
    ax.plot(utility["round"], utility["recall_at_1"], marker="s", label="retrieval recall@1")
    ax.set(xlabel="round", ylabel="held-out score", ylim=(-0.02, 1.02), title="Utility of the global model")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "utility.png"))
    return paths


def plot_attack(out: Path, attack: pd.DataFrame) -> Path:
    """``attack.png``: TPR and FPR against the round, with the empirical epsilon lower bound."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(attack["round"], attack["tpr"], marker="o", label="IDIA TPR")
    ax.plot(attack["round"], attack["fpr"], marker="s", label="IDIA FPR")
    ax.set(xlabel="round", ylabel="rate", ylim=(-0.02, 1.02), title="Identity inference attack on the global model")
    ax2 = ax.twinx()
    ax2.plot(attack["round"], attack["epsilon_lower_bound"], color="tab:red", linestyle=":", marker="^",
             label="empirical epsilon lower bound")
    ax2.set_ylabel("epsilon lower bound (jointly 95% over rounds)")
    ax2.set_ylim(0, max(1.0, 1.1 * float(attack["epsilon_lower_bound"].fillna(0).max())) if len(attack) else 1.0)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="upper left")
    return _save(fig, out / "attack.png")


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
