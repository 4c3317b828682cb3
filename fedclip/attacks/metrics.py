"""Membership metrics and an empirical epsilon lower bound from an attack's decisions.

For an (epsilon, delta)-DP mechanism and the right privacy unit, every membership test obeys
TPR <= e^eps FPR + delta and TNR <= e^eps FNR + delta. With one-sided Clopper-Pearson bounds
(TPR and TNR from below, FPR and FNR from above, at ``confidence``) the largest eps consistent
with the observed rates is a lower bound that holds with that confidence, *if* members and
non-members were assigned at random and the attack's unit matches the DP unit (a person for
IDIA, so compare it with identity-level epsilon; record-level epsilon protects a person with k
images only through group privacy, roughly k times larger).
"""

from __future__ import annotations

import math

import pandas as pd
from scipy import stats


def clopper_pearson(successes: int, trials: int, *, confidence: float) -> tuple[float, float]:
    """One-sided bounds at ``confidence``: (lower, upper) of a binomial proportion."""
    if trials == 0:
        return 0.0, 1.0
    alpha = 1 - confidence
    lower = 0.0 if successes == 0 else float(stats.beta.ppf(alpha, successes, trials - successes + 1))
    upper = 1.0 if successes == trials else float(stats.beta.ppf(1 - alpha, successes + 1, trials - successes))
    return lower, upper


def epsilon_lower_bound(tp: int, fn: int, fp: int, tn: int, *, delta: float, confidence: float = 0.95) -> float:
    """Largest eps that the observed confusion matrix rules out being below (0 if none)."""
    tpr_lo, _ = clopper_pearson(tp, tp + fn, confidence=confidence)
    _, fpr_hi = clopper_pearson(fp, fp + tn, confidence=confidence)
    tnr_lo, _ = clopper_pearson(tn, fp + tn, confidence=confidence)
    _, fnr_hi = clopper_pearson(fn, tp + fn, confidence=confidence)
    bounds = [0.0]
    for num, den in ((tpr_lo - delta, fpr_hi), (tnr_lo - delta, fnr_hi)):
        if num > 0 and den > 0:
            bounds.append(math.log(num / den))
    return max(bounds)


def membership_metrics(frame: pd.DataFrame, *, delta: float, confidence: float = 0.95) -> dict[str, float]:
    """TPR, FPR, precision, recall, accuracy and the empirical epsilon lower bound."""
    truth = frame["is_member"].astype(bool)
    pred = frame["predicted_member"].astype(bool)
    tp, fn = int((truth & pred).sum()), int((truth & ~pred).sum())
    fp, tn = int((~truth & pred).sum()), int((~truth & ~pred).sum())
    tpr = tp / (tp + fn) if tp + fn else float("nan")
    fpr = fp / (fp + tn) if fp + tn else float("nan")
    return {
        "tpr": tpr,
        "fpr": fpr,
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tpr,
        "accuracy": (tp + tn) / len(frame) if len(frame) else float("nan"),
        "epsilon_lower_bound": epsilon_lower_bound(tp, fn, fp, tn, delta=delta, confidence=confidence),
        "members": tp + fn,
        "non_members": fp + tn,
    }


def per_site_rates(frame: pd.DataFrame) -> pd.DataFrame:
    """TPR per site (members only: non-members belong to no site), with the shared FPR."""
    fpr = frame.loc[~frame["is_member"].astype(bool), "predicted_member"].astype(bool).mean()
    members = frame[frame["is_member"].astype(bool)]
    rows = [{"site": site, "members": len(g), "tpr": float(g["predicted_member"].astype(bool).mean()), "fpr": float(fpr)}
            for site, g in members.groupby("site")]
    return pd.DataFrame(rows, columns=["site", "members", "tpr", "fpr"])


def attack_tables(decisions: pd.DataFrame, *, attack: str, round_: int, max_site_epsilon: float, delta: float,
                  confidence: float) -> tuple[dict, list[dict]]:
    """One round's rows of ``attack.csv`` and ``attack_sites.csv``, the same for the server's
    per-round hook and the auditor's later pass over saved models."""
    m = membership_metrics(decisions, delta=delta, confidence=confidence)
    row = {"round": round_, "attack": attack, "max_site_epsilon": max_site_epsilon, **m}
    sites = [{"round": round_, "attack": attack, **r} for r in per_site_rates(decisions).to_dict("records")]
    return row, sites
