"""Renyi divergences of Skellam distributions computed numerically from their mass functions:
the independent computation the bounds in fedclip.distributed are checked against."""

from __future__ import annotations

import numpy as np
from scipy.special import ive, logsumexp


def skellam_logpmf(k: np.ndarray, variance: float) -> np.ndarray:
    """log P[Sk(mu) = k] = log(e^-mu I_|k|(mu)) for Poisson(mu/2) - Poisson(mu/2)."""
    return np.log(ive(np.abs(k), variance))


def support(variance: float, reach: int) -> np.ndarray:
    """Integers where the mass is representable (ive underflows far out) and the sums converge."""
    half = int(min(25 * np.sqrt(variance) + reach, 30 * np.sqrt(variance) + 20))
    return np.arange(-half, half + 1)


def renyi(log_p: np.ndarray, log_q: np.ndarray, order: float) -> float:
    """D_order(P || Q) from log masses on a common support."""
    return float(logsumexp(order * log_p + (1 - order) * log_q)) / (order - 1)


def skellam_shift_divergence(shift: int, *, variance: float, order: int) -> float:
    """D_order(Sk(mu) + shift || Sk(mu)), one coordinate."""
    k = support(variance, reach=abs(shift) * order + 10)
    return renyi(skellam_logpmf(k - shift, variance), skellam_logpmf(k, variance), order)


def subsampled_skellam_divergences(shift: int, *, variance: float, order: int, rate: float) -> tuple[float, float]:
    """Both directions between (1-q) Sk(mu) + q (Sk(mu) + shift) and Sk(mu): add and remove."""
    k = support(variance, reach=abs(shift) * order + 10)
    log_p = skellam_logpmf(k, variance)
    log_mix = np.logaddexp(np.log1p(-rate) + log_p, np.log(rate) + skellam_logpmf(k - shift, variance))
    return renyi(log_mix, log_p, order), renyi(log_p, log_mix, order)
