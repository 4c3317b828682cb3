"""Renyi DP accounting of distributed Skellam sums: events apart from the accountant.

An event (``SkellamSumEvent``) is immutable and says what was released: ``steps`` sums of integer
vectors with L1/L2 sensitivities ``l1``/``l2`` (grid units), carrying Sk(``variance``) noise,
each over units Poisson-sampled with rate ``sample_rate``. ``epsilon`` composes events (RDP adds
over releases) and converts to (epsilon, delta).

Why RDP and not the PLD the local modes use: dp-accounting has no Skellam mechanism, and the
Skellam theorem (``fedclip.distributed.skellam``) is stated in RDP. Two results carry the rest:

* **Poisson subsampling**, add-or-remove one unit. Condition on the rest of the sample (the
  mixture over it has the same weights in both worlds: joint quasi-convexity of Renyi divergence,
  van Erven and Harremoes 2014). With Q the mechanism's output without the unit, P with it, and
  the unit sampled with probability q, the two directions are, at integer order a >= 2:
  *adding*: D_a((1-q)Q + qP || Q) = 1/(a-1) log E_Q[(1 - q + q X)^a], X = P/Q, expanded by the
  binomial theorem with E_Q[X^l] = exp((l-1) D_l(P||Q)) <= exp((l-1) eps(l)) (the expansion of
  Mironov, Talwar and Zhang 2019, exact but for the RDP bound);
  *removing*: D_a(Q || (1-q)Q + qP) = 1/(a-1) log E_Q[(1 + t)^-k], k = a - 1, t = q(X - 1) >= -q.
  For t >= 0, Taylor's theorem with Lagrange's remainder gives (1+t)^-k <= 1 - k t + c_+ t^2 with
  c_+ = k(k+1)/2; for -q <= t < 0 every term of the series sum_n C(k+n-1, n) (-t)^n is positive and
  |t| <= q, so (1+t)^-k <= 1 - k t + c t^2 with c = ((1-q)^-k - 1 - k q) / q^2 >= c_+. With
  E_Q[t] = 0 and E_Q[t^2] = q^2 (exp(D_2(P||Q)) - 1):
  D_a <= 1/(a-1) log(1 + ((1-q)^-(a-1) - 1 - (a-1) q) (e^eps(2) - 1)).
  The bound is the larger of the two, and never above eps(a) (sampling cannot hurt). Zhu and Wang's
  general bound (ICML 2019, Theorem 6) covers both directions too but keeps a positive floor as the
  noise grows, which over hundreds of steps costs more than the mechanism.
* **Conversion** to (epsilon, delta): dp-accounting's own ``compute_epsilon`` (Balle, Barthe,
  Gaboardi, Hsu, Sato, AISTATS 2020: eps = min_a [rdp(a) + log((a-1)/a) - (log delta + log a)/(a-1)]).

The subsampling bound is checked in ``tests/distributed/test_accounting.py`` against
dp-accounting's exact RDP of the subsampled Gaussian and against numerically computed
divergences of subsampled Skellam noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon
from scipy.special import gammaln, logsumexp

from fedclip.distributed.skellam import skellam_rdp

ORDERS: tuple[int, ...] = (*range(2, 65), *range(72, 257, 8))


@dataclass(frozen=True, kw_only=True)
class SkellamSumEvent:
    """``steps`` releases of a sum carrying Sk(``variance``) noise; sensitivities in grid units."""

    variance: float
    l1: float
    l2: float
    sample_rate: float = 1.0
    steps: int = 1

    def __post_init__(self) -> None:
        if not (self.variance > 0 and math.isfinite(self.variance)):
            raise ValueError(f"variance: expected a finite value > 0, got {self.variance}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate: expected a value in (0, 1], got {self.sample_rate}")
        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"steps: expected an integer >= 0, got {self.steps}")

    def rdp(self, order: int) -> float:
        """The event's RDP at ``order``: all its steps."""
        if self.steps == 0:
            return 0.0

        def base(a: int) -> float:
            return skellam_rdp(a, l1=self.l1, l2=self.l2, variance=self.variance)

        return self.steps * poisson_subsampled_rdp(order, sample_rate=self.sample_rate, rdp_of=base)


def _log_comb(n: int, k: int) -> float:
    return float(gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1))


def poisson_subsampled_rdp(order: int, *, sample_rate: float, rdp_of: Callable[[int], float]) -> float:
    """An upper bound on the RDP of ``order`` of a mechanism with RDP curve ``rdp_of`` run on a
    Poisson sample with rate ``sample_rate``, both directions of add-or-remove (module docstring)."""
    a, q = int(order), float(sample_rate)
    if a != order or a < 2:
        raise ValueError(f"order: the subsampling bound holds for integer orders >= 2, got {order}")
    if q == 1.0:
        return rdp_of(a)
    log_q, log_1q = math.log(q), math.log1p(-q)
    # adding: E_Q[(1 - q + q P/Q)^a] expanded; E_Q[(P/Q)^l] = exp((l-1) D_l(P||Q)), exactly 1 for l = 0, 1
    terms = [a * log_1q, math.log(a) + log_q + (a - 1) * log_1q]
    terms += [_log_comb(a, ell) + (a - ell) * log_1q + ell * log_q + (ell - 1) * rdp_of(ell) for ell in range(2, a + 1)]
    adding = float(logsumexp(terms)) / (a - 1)
    # removing: E_Q[(1 - q + q P/Q)^-(a-1)] <= 1 + ((1-q)^-(a-1) - 1 - (a-1) q) (e^D_2(P||Q) - 1)
    k = a - 1
    log_coefficient = math.log(math.expm1(-k * log_1q) - k * q)
    log_excess = log_coefficient + _log_expm1(rdp_of(2))
    removing = math.log1p(math.exp(log_excess)) / k if log_excess < 700 else log_excess / k
    return min(max(adding, removing), rdp_of(a))


def _log_expm1(x: float) -> float:
    return x + math.log(-math.expm1(-x)) if x > 0 else -math.inf


def rdp_curve(events: Iterable[SkellamSumEvent], orders: Sequence[int] = ORDERS) -> np.ndarray:
    """The composed RDP of ``events`` at each of ``orders`` (RDP adds over releases)."""
    events = tuple(events)
    return np.array([sum(e.rdp(a) for e in events) for a in orders], dtype=float)


def epsilon(events: Iterable[SkellamSumEvent], *, delta: float, orders: Sequence[int] = ORDERS) -> float:
    """Epsilon at ``delta`` of every event composed; 0 for no event."""
    events = tuple(e for e in events if e.steps > 0)
    if not events:
        return 0.0
    if not 0 < delta < 1:
        raise ValueError(f"delta: expected a value in (0, 1), got {delta}")
    eps, _order = compute_epsilon(list(orders), list(rdp_curve(events, orders)), delta)
    return float(eps)
