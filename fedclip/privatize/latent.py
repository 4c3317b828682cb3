"""Per-image latent clipping and noise, and what it costs.

**Sensitivity.** Each image's latent z = f(x) is clipped *on its own* to norm <= s (L2 for the
Gaussian mechanism, L1 for Laplace): a row norm, never a norm over the batch, so no image's
output depends on another image (the published CADP code took one matrix norm over the whole
batch, coupling every image of a batch). Replacing an image by any other moves its clipped latent
from a to b with |a|, |b| <= s, so by at most 2s: the replace-one sensitivity is 2s, not s.

**Neighbouring relation.** Local, replace-one: for any two inputs of the same shape, the outputs
are indistinguishable. A privacy unit with k images (a patient, at identity level) is k such
releases, composed: Gaussian as dp-accounting's replace-one PLD (sample rate 1, k steps,
sensitivity s in units of s, which is the distance 2s: checked against the closed form in the
tests); Laplace by basic composition of pure DP, k * 2s / b. Nothing here hides how many images
a unit has, or that it is in the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import torch

from fedclip.privacy.accountant import epsilon
from fedclip.privacy.events import DpEvent, PrivacyUnit, Relation
from fedclip.privacy.randomness import gaussian_noise


class Mechanism(StrEnum):
    GAUSSIAN = "gaussian"
    LAPLACE = "laplace"


@dataclass(frozen=True, kw_only=True)
class LatentNoise:
    """``radius`` s; ``noise_multiplier``: the Gaussian's std, or the Laplace scale, over s."""

    mechanism: Mechanism
    radius: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "mechanism", Mechanism(self.mechanism))
        if not (self.radius > 0 and math.isfinite(self.radius)):
            raise ValueError(f"radius: expected a finite clipping radius > 0, got {self.radius}")
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier: expected a finite value > 0, got {self.noise_multiplier}")

    @property
    def norm_order(self) -> int:
        return 2 if self.mechanism == Mechanism.GAUSSIAN else 1


def clip_latents(latents: torch.Tensor, *, radius: float, norm_order: int) -> torch.Tensor:
    """Every row scaled into the ball of ``radius`` (its own norm only)."""
    norms = torch.linalg.vector_norm(latents, ord=norm_order, dim=1, keepdim=True)
    return latents * torch.clamp(radius / norms.clamp(min=1e-12), max=1.0)


def _laplace(shape: torch.Size, scale: float, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5  # inverse CDF, from the given stream
    return (-scale * torch.sign(u) * torch.log1p(-2 * u.abs())).float()


def privatize_latents(latents: torch.Tensor, *, noise: LatentNoise, generator: torch.Generator) -> torch.Tensor:
    """Clip each latent to the radius, add the mechanism's noise (std or scale ``noise_multiplier * s``).
    ``generator`` must be seeded from the OS (``fedclip.privacy.randomness``) for a private release."""
    clipped = clip_latents(latents, radius=noise.radius, norm_order=noise.norm_order)
    scale = noise.noise_multiplier * noise.radius
    if noise.mechanism == Mechanism.GAUSSIAN:
        return clipped + gaussian_noise(clipped.shape, std=scale, generator=generator, device=clipped.device)
    return clipped + _laplace(clipped.shape, scale, generator)


def latent_event(noise: LatentNoise, *, images: int, privacy_unit: PrivacyUnit) -> DpEvent:
    """The Gaussian release of ``images`` images of one unit, as a ledger event (replace-one)."""
    if noise.mechanism != Mechanism.GAUSSIAN:
        raise ValueError(
            "latent_event: only the Gaussian mechanism has a ledger event; Laplace is pure DP (latent_epsilon)"
        )
    return DpEvent(
        noise_multiplier=noise.noise_multiplier,
        sample_rate=1.0,
        steps=images,
        privacy_unit=privacy_unit,
        relation=Relation.REPLACE_ONE,
        sensitivity=1.0,
    )


def latent_epsilon(noise: LatentNoise, *, images: int, delta: float) -> float:
    """Epsilon of one unit with ``images`` images (Gaussian at ``delta``; Laplace pure, delta 0)."""
    if images < 1:
        raise ValueError(f"images: expected >= 1 images per unit, got {images}")
    if noise.mechanism == Mechanism.LAPLACE:
        return images * 2.0 / noise.noise_multiplier  # each image: L1 sensitivity 2s, scale b = multiplier * s
    return epsilon([latent_event(noise, images=images, privacy_unit=PrivacyUnit.IDENTITY)], delta=delta)


def calibrate_latent_noise(
    mechanism: Mechanism | str, *, target_epsilon: float, delta: float, images: int, radius: float
) -> LatentNoise:
    """The smallest noise whose epsilon for a unit of ``images`` images is at most ``target_epsilon``."""
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target epsilon: expected a finite value > 0, got {target_epsilon}")
    if Mechanism(mechanism) == Mechanism.LAPLACE:
        return LatentNoise(mechanism=mechanism, radius=radius, noise_multiplier=2.0 * images / target_epsilon)
    low, high = 1e-3, 1.0
    make = lambda m: LatentNoise(mechanism=mechanism, radius=radius, noise_multiplier=m)  # noqa: E731
    while latent_epsilon(make(high), images=images, delta=delta) > target_epsilon:
        low, high = high, 2 * high
    for _ in range(40):  # bisection, keeping `high` on the safe side
        mid = (low + high) / 2
        low, high = (
            (mid, high) if latent_epsilon(make(mid), images=images, delta=delta) > target_epsilon else (low, mid)
        )
    return make(high)
