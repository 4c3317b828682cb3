"""PNG plots of a run: epsilon per site, attack rates, and utility, each against the round."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

if TYPE_CHECKING:  # torch loads only where images are drawn
    import torch


def plot_run(
    out_dir: str | Path,
    rounds: pd.DataFrame,
    attack: pd.DataFrame,
    utility: pd.DataFrame,
    scores: pd.DataFrame | None = None,
) -> list[Path]:
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
    if scores is not None and (roc := plot_roc(out, scores)) is not None:
        paths.append(roc)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(utility["round"], utility["zero_shot_accuracy"], marker="o", label="zero-shot accuracy")
    ax.plot(utility["round"], utility["recall_at_1"], marker="s", label="retrieval recall@1")
    ax.set(xlabel="round", ylabel="held-out score", ylim=(-0.02, 1.02), title="Utility of the global model")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "utility.png"))
    return paths


def plot_attack(out: Path, attack: pd.DataFrame) -> Path:
    """``attack.png``: each attack's TPR and FPR against the round (left); the accountant's epsilon
    beside what each attack bounds from below (right: certified for randomised audits, dotted for
    the indicative bound of the others)."""
    attack = attack.assign(attack=attack["attack"] if "attack" in attack.columns else "idia")
    from fedclip.attacks.metrics import certified_bounds

    audited = certified_bounds(attack)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, g in attack.groupby("attack", sort=False):
        line = ax.plot(g["round"], g["tpr"], marker="o", label=f"{name} TPR")[0]
        ax.plot(g["round"], g["fpr"], marker="s", linestyle="--", color=line.get_color(), label=f"{name} FPR")
        certified = audited[g.index]
        if certified.notna().any():
            ax2.plot(g["round"], certified, marker="^", color=line.get_color(), label=f"{name}: certified")
        else:
            ax2.plot(
                g["round"],
                g["epsilon_lower_bound"],
                marker="^",
                linestyle=":",
                color=line.get_color(),
                label=f"{name}: indicative bound",
            )
    on_replies = attack["attack"].astype(str).str.endswith("-replies").any()
    ax.set(
        xlabel="round",
        ylabel="rate",
        ylim=(-0.02, 1.02),
        title="Attacks on the global model" + (" and on each site's reply (*-replies)" if on_replies else ""),
    )
    ax.legend(fontsize=7)
    accountant = attack.groupby("round")["max_site_epsilon"].first()
    finite = accountant.replace(float("inf"), float("nan"))
    ax2.plot(finite.index, finite.values, color="black", linewidth=2, label="accountant: max site epsilon")
    top = pd.concat([finite, audited, attack["epsilon_lower_bound"]]).replace(float("inf"), float("nan")).max()
    ax2.set(
        xlabel="round",
        ylabel="epsilon",
        ylim=(0, max(1.0, 1.1 * float(0 if pd.isna(top) else top))),
        title="Accounted vs audited epsilon (jointly 95%)",
    )
    ax2.legend(fontsize=7)
    return _save(fig, out / "attack.png")


def plot_roc(out: Path, scores: pd.DataFrame) -> Path | None:
    """``roc.png``: each scored attack's ROC at the last round, on log axes (the low-FPR regime is
    what matters: Carlini et al. 2022), with the chance diagonal."""
    from fedclip.attacks.metrics import roc_curve

    if not len(scores):
        return None
    last = scores[scores["round"] == scores["round"].max()]
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, g in last.groupby("attack", sort=False):
        fpr, tpr = roc_curve(g["score"].to_numpy(), g["is_member"].astype(bool).to_numpy())
        ax.plot(fpr, tpr, label=f"{name} ({len(g)} targets)")
    ax.plot([1e-3, 1], [1e-3, 1], color="grey", linestyle=":", label="chance")
    ax.set(
        xscale="log",
        yscale="log",
        xlim=(1e-3, 1),
        ylim=(1e-3, 1.05),
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=f"ROC at round {int(last['round'].iloc[0])}",
    )
    ax.legend(fontsize=8)
    return _save(fig, out / "roc.png")


def plot_image_grid(
    path: str | Path,
    rows: dict[str, torch.Tensor],
    *,
    title: str,
    captions: list[str] | None = None,
) -> Path:
    """A grid of images: one row per named version (original, privatized, masked, ...), one
    column per example; tensors [N, 3, H, W] in [0, 1]. People would rather look than read."""
    n = min(len(t) for t in rows.values())
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.7 * len(rows)), squeeze=False)
    for r, (name, images) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(images[c].clamp(0, 1).permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
            if r == 0 and captions:
                ax.set_title(captions[c], fontsize=6)
    fig.suptitle(title, fontsize=9)
    return _save(fig, Path(path))


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
