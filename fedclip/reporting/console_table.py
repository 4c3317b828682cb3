"""The end-of-run table on the console: one row per round, what a reader checks first."""

from __future__ import annotations

import pandas as pd

from fedclip.attacks.metrics import certified_bounds


def run_table(utility: pd.DataFrame, attack: pd.DataFrame, rounds: pd.DataFrame) -> str:
    """Round, utility, the largest site epsilon, and per attack its AUC with the certified bound
    (randomised audits: the larger of the one-run and Gaussian-pair bounds) or the TPR at 1% FPR (the others)."""
    table = utility.set_index("round")[["zero_shot_accuracy", "recall_at_1"]].rename(
        columns={"zero_shot_accuracy": "zero-shot", "recall_at_1": "recall@1"}
    )
    if len(rounds):
        spent = rounds.groupby("round")["epsilon"].max().cummax()
        table["max eps"] = spent.reindex(table.index).ffill().fillna(0.0)
    if len(attack):
        attack = attack.assign(attack=attack["attack"] if "attack" in attack.columns else "idia")
        for name, g in attack.groupby("attack", sort=False):
            g = g.set_index("round")
            if "auc" in g:
                table[f"{name} AUC"] = g["auc"]
            certified = certified_bounds(g)
            if certified.notna().any():
                table[f"{name} audited eps"] = certified
            elif "tpr_at_1pct_fpr" in g:
                table[f"{name} TPR@1%"] = g["tpr_at_1pct_fpr"]
    return table.to_string(float_format=lambda v: f"{v:.3f}")
