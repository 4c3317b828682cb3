"""Skellam noise and its Renyi DP (Agarwal, Kairouz, Liu, NeurIPS 2021, arXiv 2110.04995).

Sk(mu) here is Poisson(mu/2) - Poisson(mu/2): integer, symmetric, variance ``mu``. A sum of
independent Sk(mu_i) is Sk(sum mu_i) exactly (Poisson is closed under addition), which is why the
sum of the sites' shares is itself one Skellam mechanism and no approximation enters the
accounting (the discrete Gaussian is not closed under addition).

**Theorem (Agarwal et al. 2021, Theorem 3.5 / Corollary 3.6).** Adding Sk(mu) to every
coordinate of an integer vector whose L1 and L2 sensitivities are ``l1`` and ``l2`` satisfies,
for every integer order alpha > 1, (alpha, eps(alpha))-RDP with

    eps(alpha) = alpha * l2**2 / (2 mu) + min(((2 alpha - 1) l2**2 + 6 l1) / (4 mu**2), 3 l1 / (2 mu)).

The first term is the Gaussian mechanism's; the second is the price of being discrete and
vanishes as mu grows. ``tests/distributed/test_skellam.py`` checks the bound against the Renyi
divergence of Skellam distributions computed numerically from their probability mass.
"""

from __future__ import annotations

import math

import torch


def skellam_rdp(order: int, *, l1: float, l2: float, variance: float) -> float:
    """RDP of order ``order`` (an integer >= 2) of Sk(``variance``) on sensitivities ``l1``, ``l2``."""
    if int(order) != order or order < 2:
        raise ValueError(f"order: the Skellam bound holds for integer orders >= 2, got {order}")
    if not variance > 0:
        raise ValueError(f"variance: expected a value > 0, got {variance}")
    if l1 < 0 or l2 < 0:
        raise ValueError(f"sensitivities: expected values >= 0, got l1={l1}, l2={l2}")
    a, mu = float(order), float(variance)
    return a * l2**2 / (2 * mu) + min(((2 * a - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))


def skellam_noise(shape: tuple[int, ...] | torch.Size, *, variance: float, generator: torch.Generator) -> torch.Tensor:
    """Integer Sk(``variance``) noise (int64), drawn from ``generator`` (OS-seeded at a site:
    ``fedclip.privacy.randomness``). Poisson draws are made in float64, exact for the integers
    a secure sum can carry (< 2**53)."""
    if variance < 0 or not math.isfinite(variance):
        raise ValueError(f"variance: expected a finite value >= 0, got {variance}")
    if variance == 0:
        return torch.zeros(shape, dtype=torch.int64)
    rates = torch.full(tuple(shape), variance / 2, dtype=torch.float64)
    plus = torch.poisson(rates, generator=generator)
    minus = torch.poisson(rates, generator=generator)
    return (plus - minus).to(torch.int64)
