"""``summary.md``: what was run, what the accountant promises, what the attacker extracted."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

UNIT_TEXT = {
    "identity": "one patient (all of their image-report pairs)",
    "record": "one image-report pair; a patient with k pairs is protected only through group privacy (about k times epsilon)",
}
RELATION_TEXT = {
    "replace_one": "per-micro-batch clipping: one unit changes one hashed micro-batch, a replace-one change of one clipped term (sensitivity C), accounted with a replace-one PLD",
    "add_or_remove": "paper mode: one clipped batch, a unit moves it by up to 2C (sensitivity 2C), accounted with Opacus' add-or-remove accountant",
}


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def write_summary(path: str | Path, *, config: Mapping[str, Any], rounds: pd.DataFrame, attack: pd.DataFrame,
                  utility: pd.DataFrame, noise_multiplier: float, site_level: Mapping[str, Any] | None = None) -> Path:
    last = int(rounds["round"].max()) if len(rounds) else 0
    final_sites = rounds[rounds["round"] == last][["site", "epsilon", "budget"]] if len(rounds) else rounds
    selected = rounds.groupby("site")["selected"].sum() if len(rounds) else pd.Series(dtype=int)
    lines = [
        "# fedclip run summary", "",
        f"- dp mode: **{config['dp-mode']}**, privacy unit: **{config['privacy-unit']}**, "
        f"noise multiplier {noise_multiplier:.4g}, clipping norm C = {config['max-grad-norm']}, "
        f"sample rate {config['sample-rate']}, {config['local-steps']} local steps per round, "
        f"{config['num-rounds']} rounds, delta = {config['delta']:g}",
        f"- strategy: {config['strategy']} wrapped by PrivacyBudgetStrategy (budget {config['budget']}"
        + (f", per site: {config['site-budgets']}" if config["site-budgets"] else "") + ")",
        "",
        "## What the accountant promises",
        "",
    ]
    if config["dp-mode"] == "nonprivate":
        lines.append("Locally nothing: sites add no noise, so the per-site epsilon below is infinite.")
    else:
        lines += [
            f"Each epsilon is an upper bound for data sets that differ by adding or removing {UNIT_TEXT[config['privacy-unit']]}, "
            f"at delta = {config['delta']:g}, composed over every round the site trained. Mechanism: "
            f"{RELATION_TEXT['replace_one' if config['dp-mode'] == 'microbatch' else 'add_or_remove']}.",
        ]
    if site_level:
        lines += ["", f"Client-level DP at the server: each site's update clipped to {site_level['clip_norm']}, "
                  f"noise multiplier {site_level['noise_multiplier']:.4g} on the average, over {site_level['rounds']} rounds: "
                  f"**epsilon {site_level['epsilon']:.3f}** at delta {site_level['delta']:g} for adding or removing a whole "
                  "site (Flower's RDP accountant, no sampling amplification)."]
    lines += ["", "| site | rounds trained | epsilon | budget |", "|---|---|---|---|"]
    for row in final_sites.itertuples():
        lines.append(f"| {row.site} | {int(selected.get(row.site, 0))} | {_fmt(float(row.epsilon))} | {row.budget} |")
    lines += [
        "", "Released outside the guarantee: each site's example count and mean training loss per round "
        "(site sizes are treated as public).", "",
        "## What the attacker extracted (IDIA on the global model)", "",
        "| round | TPR | FPR | precision | accuracy | empirical epsilon lower bound | max site epsilon |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in attack.itertuples():
        lines.append(f"| {row.round} | {row.tpr:.3f} | {row.fpr:.3f} | {_fmt(float(row.precision))} | {row.accuracy:.3f} | "
                     f"{row.epsilon_lower_bound:.3f} | {_fmt(float(row.max_site_epsilon))} |")
    lines += [
        "", "The lower bound uses one-sided 95% Clopper-Pearson intervals on TPR and FPR; it is about a *person*, "
        "so compare it with identity-level epsilon.", "",
        "## Utility on held-out patients", "",
        "| round | zero-shot accuracy | recall@1 | recall@5 |", "|---|---|---|---|",
    ]
    for row in utility.itertuples():
        lines.append(f"| {row.round} | {row.zero_shot_accuracy:.3f} | {row.recall_at_1:.3f} | {row.recall_at_5:.3f} |")
    lines += ["", "Plots: `epsilon.png`, `attack.png`, `utility.png`. Tables: `rounds.csv`, `attack.csv`, "
              "`attack_sites.csv`, `utility.csv`.", ""]
    path = Path(path)
    path.write_text("\n".join(lines))
    return path
