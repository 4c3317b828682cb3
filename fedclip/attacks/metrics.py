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

import numpy as np
import pandas as pd
from scipy import stats

from fedclip.attacks.base import AttackDecisions
from fedclip.attacks.gaussian_pair import GaussianPair
from fedclip.attacks.one_run import audit_scores


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
    rows = [
        {"site": site, "members": len(g), "tpr": float(g["predicted_member"].astype(bool).mean()), "fpr": float(fpr)}
        for site, g in members.groupby("site")
    ]
    return pd.DataFrame(rows, columns=["site", "members", "tpr", "fpr"])


def roc_curve(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every threshold "member if score >= t", from (0, 0) to (1, 1); ties move together."""
    scores, truth = np.asarray(scores, dtype=float), np.asarray(is_member, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], truth[order]
    last = np.r_[np.diff(s) != 0, True]  # the last position of each distinct score
    tp, fp = np.cumsum(t)[last], np.cumsum(~t)[last]
    return np.r_[0.0, fp / max(1, (~truth).sum())], np.r_[0.0, tp / max(1, truth.sum())]


def score_metrics(scores: np.ndarray, is_member: np.ndarray) -> dict[str, float]:
    """AUC (ties count half) and the TPR at FPR <= 1% and <= 0.1%: the low-FPR regime that matters
    (Carlini et al. 2022). With fewer than 1,000 non-members, "0.1% FPR" means no false positive."""
    truth = np.asarray(is_member, dtype=bool)
    if truth.all() or not truth.any():
        return {"auc": float("nan"), "tpr_at_1pct_fpr": float("nan"), "tpr_at_0.1pct_fpr": float("nan")}
    ranks = stats.rankdata(scores)
    n1, n0 = truth.sum(), (~truth).sum()
    auc = (ranks[truth].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
    fpr, tpr = roc_curve(scores, truth)
    return {
        "auc": float(auc),
        "tpr_at_1pct_fpr": float(tpr[fpr <= 0.01].max()),
        "tpr_at_0.1pct_fpr": float(tpr[fpr <= 0.001].max()),
    }


def attack_tables(
    decisions: AttackDecisions, *, round_: int, max_site_epsilon: float, delta: float, confidence: float
) -> tuple[dict, list[dict]]:
    """One round's rows of ``attack.csv`` and ``attack_sites.csv``, the same for the server's
    per-round hook and the auditor's later pass over saved models. Score metrics need a ``score``
    column; the one-run bound (``audited_epsilon``) needs randomised membership."""
    frame, attack = decisions.frame, decisions.attack
    m = membership_metrics(frame, delta=delta, confidence=confidence)
    scored = "score" in frame.columns
    m |= (
        score_metrics(frame["score"].to_numpy(), frame["is_member"].to_numpy())
        if scored
        else dict.fromkeys(("auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr"), float("nan"))
    )
    if decisions.randomised and scored:
        audit = audit_scores(
            frame["score"].to_numpy(), frame["is_member"].to_numpy(), delta=delta, confidence=confidence
        )
        m |= {
            "audited_epsilon": audit.epsilon_lower_bound,
            "audit_guesses": audit.guesses,
            "audit_correct": audit.correct,
        }
    else:
        m |= {"audited_epsilon": float("nan"), "audit_guesses": float("nan"), "audit_correct": float("nan")}
    m |= gaussian_columns(decisions, delta=delta, confidence=confidence)
    row = {"round": round_, "attack": attack, "max_site_epsilon": max_site_epsilon, "audit_confidence": confidence, **m}
    sites = [{"round": round_, "attack": attack, **r} for r in per_site_rates(frame).to_dict("records")]
    return row, sites


GAUSSIAN_COLUMNS = (
    "gaussian_epsilon",
    "gaussian_epsilon_95",
    "gaussian_epsilon_estimate",
    "gaussian_mu",
    "normality_p",
)
ONE_TEST = 0.95  # the confidence of one bound chosen before the run (the final round's), not of the family


def gaussian_columns(decisions: AttackDecisions, *, delta: float, confidence: float) -> dict[str, float]:
    """The Gaussian-pair audit's columns (``fedclip.attacks.gaussian_pair``): white-box canaries
    only, whose scores are sums of per-step noise; NaN for every other attack. ``gaussian_epsilon``
    holds at ``confidence`` (jointly with every round's and audit's bound); ``gaussian_epsilon_95``
    is the same bound at 95% alone, valid for one row named before the run (the final round)."""
    if not (decisions.randomised and decisions.white_box):
        return dict.fromkeys(GAUSSIAN_COLUMNS, float("nan"))
    frame = decisions.frame
    scores, included = frame["score"].to_numpy(), frame["is_member"].to_numpy()
    pair = GaussianPair.from_scores(scores, included)
    audit = pair.audit(delta=delta, confidence=confidence)
    return {
        "gaussian_epsilon": audit.epsilon_lower_bound,
        "gaussian_epsilon_95": pair.audit(delta=delta, confidence=ONE_TEST).epsilon_lower_bound,
        "gaussian_epsilon_estimate": audit.epsilon_estimate,
        "gaussian_mu": audit.mu_lower_bound,
        "normality_p": audit.normality_p,
    }


def certified_bounds(attack: pd.DataFrame) -> pd.Series:
    """Each row of an attack table's largest certified bound: the one-run bound, and for white-box
    canaries the Gaussian-pair bound (NaN where neither applies; older tables lack the columns)."""
    columns = [c for c in ("audited_epsilon", "gaussian_epsilon") if c in attack.columns]
    return attack[columns].max(axis=1, skipna=True) if columns else pd.Series(float("nan"), attack.index)


def score_rows(decisions: AttackDecisions, *, round_: int) -> list[dict]:
    """One round's rows of ``attack_scores.csv`` (per target: truth and score), for ROC curves."""
    frame = decisions.frame
    if "score" not in frame.columns:
        return []
    return [
        {
            "round": round_,
            "attack": decisions.attack,
            "target": r.target,
            "site": r.site,
            "is_member": bool(r.is_member),
            "score": float(r.score),
        }
        for r in frame.itertuples()
    ]
