"""The integer grid a site's float vector is put on before the secure sum, and what that costs.

A site scales its vector x by ``scale`` grid steps per unit and rounds each coordinate randomly
and without bias: floor(x * scale + U), U uniform on [0, 1) from the site's secret generator.
The sum is taken modulo ``2**bits``; the server centres the decoded sum and divides by ``scale``.

**Sensitivity (why sqrt(dim) and not the paper's conditional rounding).** Fix U (it is drawn
independently of the data). Then rounding is a deterministic map R_U, and if one unit moves the
float input by g (||g||_2 <= scale * clip), every coordinate of R_U(y + g) - R_U(y) differs from
g_i by less than 1, so its L2 norm is at most scale * clip + sqrt(dim) and its L1 norm at most
sqrt(dim) * scale * clip + dim; an integer vector's L1 norm is also at most its squared L2 norm.
The Skellam bound then holds for every U, and the mechanism that draws U is a mixture of those
with the same weights in both worlds, whose Renyi divergence is at most the largest one (joint
quasi-convexity, van Erven and Harremoes 2014, Theorem 13). The argument needs no assumption on
*whose* vector moves, so it covers a patient inside a site's sum as well as a whole site's
update, which Kairouz et al.'s conditional rounding (a bound on one rounded vector's norm) does
not. ``for_clip`` picks the scale that makes the rounding term a small share of the sensitivity.

**Wrap-around is utility, not privacy.** The sum modulo 2**bits is a function of the exact
integer sum, so it is post-processing; a coordinate that leaves [-2**(bits-1), 2**(bits-1)) only
decodes wrong. ``wrap_probability`` bounds how likely that is (Chernoff on the Skellam tail,
union over coordinates), and a plan with a large one is refused before training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_BITS = 62  # int64 arithmetic; a secure sum may allow fewer (Flower's SecAgg+: 32 minus log2 of the sites)


@dataclass(frozen=True)
class Sensitivity:
    """L2 and L1 sensitivity of a rounded vector, in grid steps."""

    l2: float
    l1: float


@dataclass(frozen=True, kw_only=True)
class Grid:
    """``scale`` grid steps per unit, a sum modulo ``2**bits``, vectors of ``dim`` coordinates."""

    scale: float
    bits: int
    dim: int

    def __post_init__(self) -> None:
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"scale: expected a finite value > 0, got {self.scale}")
        if int(self.bits) != self.bits or not 2 <= self.bits <= MAX_BITS:
            raise ValueError(f"bits: expected an integer in [2, {MAX_BITS}], got {self.bits}")
        if int(self.dim) != self.dim or self.dim < 1:
            raise ValueError(f"dim: expected an integer >= 1, got {self.dim}")

    @classmethod
    def for_clip(cls, *, clip: float, dim: int, bits: int, rounding_share: float = 0.01) -> "Grid":
        """The grid whose rounding adds ``rounding_share`` of ``clip``'s sensitivity: sqrt(dim) =
        rounding_share * scale * clip."""
        if not clip > 0:
            raise ValueError(f"clip: expected a value > 0, got {clip}")
        if not 0 < rounding_share <= 1:
            raise ValueError(f"rounding_share: expected a value in (0, 1], got {rounding_share}")
        return cls(scale=math.sqrt(dim) / (rounding_share * clip), bits=bits, dim=dim)

    @property
    def modulus(self) -> int:
        return 1 << self.bits

    def sensitivity(self, *, clip: float) -> Sensitivity:
        """Of the rounded vector when its float input moves by at most ``clip`` in L2 (module docstring)."""
        moved = self.scale * clip
        l2 = moved + math.sqrt(self.dim)
        return Sensitivity(l2=l2, l1=min(math.sqrt(self.dim) * moved + self.dim, l2**2))

    def round(self, x: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        """floor(x * scale + U): unbiased, int64; ``generator`` is the site's secret one."""
        y = x.detach().to(torch.float64).cpu().flatten() * self.scale
        if y.numel() != self.dim:
            raise ValueError(f"round: expected a vector of {self.dim} coordinates, got {y.numel()}")
        u = torch.rand(y.shape, dtype=torch.float64, generator=generator)
        return torch.floor(y + u).to(torch.int64)

    def wrap(self, v: torch.Tensor) -> torch.Tensor:
        """Into [0, 2**bits): what a site hands to the secure sum."""
        return torch.remainder(v.to(torch.int64), self.modulus)

    def centre(self, v: torch.Tensor) -> torch.Tensor:
        """A decoded modular sum back into [-2**(bits-1), 2**(bits-1))."""
        half = self.modulus // 2
        return torch.remainder(v.to(torch.int64) + half, self.modulus) - half

    def to_float(self, v: torch.Tensor) -> torch.Tensor:
        return v.to(torch.float64) / self.scale

    def wrap_probability(self, *, signal: float, variance: float) -> float:
        """An upper bound on P[some coordinate of the sum leaves the range], for a sum whose
        noise-free part has every coordinate within ``signal`` (grid steps) and Sk(``variance``) noise."""
        t = self.modulus / 2 - 1 - signal
        if t <= 0:
            return 1.0
        if variance <= 0:
            return 0.0
        r = t / variance  # Chernoff at lambda = asinh(t / mu): log P[X >= t] <= mu (cosh - 1) - lambda t
        log_tail = variance * (math.sqrt(1 + r * r) - 1) - t * math.asinh(r)
        return min(1.0, 2 * self.dim * math.exp(log_tail))
