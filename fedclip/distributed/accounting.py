"""Renyi DP accounting of distributed Skellam sums: events apart from the accountant.

An event (``SkellamSumEvent``) is immutable and says what was released: ``steps`` sums of integer
vectors with L1/L2 sensitivities ``l1``/``l2`` (grid units), carrying Sk(``variance``) noise,
each over units Poisson-sampled with rate ``sample_rate``. ``epsilon`` composes events (RDP adds
over releases) and converts to (epsilon, delta).

Why RDP and not the PLD the local modes use: dp-accounting has no Skellam mechanism, and the
Skellam theorem (``fedclip.distributed.skellam``) is stated in RDP. Two results carry the rest:

* **Poisson subsampling** (Zhu and Wang, ICML 2019, "Poisson subsampled Renyi differential
  privacy", Theorem 6): for any mechanism with RDP curve eps(.), the mechanism run on a
  Poisson sample with rate g satisfies, at integer order a >= 2,
  eps'(a) <= 1/(a-1) log[(1-g)^(a-1) (a g - g + 1) + C(a,2) g^2 (1-g)^(a-2) e^eps(2)
  + 3 sum_{l=3..a} C(a,l) (1-g)^(a-l) g^l e^((l-1) eps(l))], under add-or-remove of one unit.
  The bound is also never above eps(a) itself (sampling is a data-independent mixture).
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
    """Zhu and Wang's general upper bound (module docstring), never above ``rdp_of(order)``."""
    a, g = int(order), float(sample_rate)
    if a != order or a < 2:
        raise ValueError(f"order: the subsampling bound holds for integer orders >= 2, got {order}")
    if g == 1.0:
        return rdp_of(a)
    log_g, log_1g = math.log(g), math.log1p(-g)
    terms = [(a - 1) * log_1g + math.log(a * g - g + 1), _log_comb(a, 2) + 2 * log_g + (a - 2) * log_1g + rdp_of(2)]
    terms += [
        math.log(3) + _log_comb(a, ell) + (a - ell) * log_1g + ell * log_g + (ell - 1) * rdp_of(ell)
        for ell in range(3, a + 1)
    ]
    return min(float(logsumexp(terms)) / (a - 1), rdp_of(a))


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
