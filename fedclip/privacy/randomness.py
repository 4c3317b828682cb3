"""Where a site's privacy-protecting randomness comes from: the operating system, every round.

Local DP protects patients from the *server*, so the noise and the Poisson sampling must come
from randomness the server cannot reproduce. A seed that the server sends (or could guess from
the run config, the round and the site's name) makes the noise subtractable and the sampling
pattern known, and the guarantee against the server is gone. Generators are therefore seeded
with 64 bits from ``os.urandom`` at every site and round, and the noise is drawn with Opacus'
``secure_mode`` (a sum of Gaussians that resists floating-point attacks on the noise).

What this is not: torch's generators (Mersenne Twister on the CPU, Philox on CUDA) are not
cryptographic; the 64-bit seed is secret, but a party who saw many raw outputs could in
principle recover the state. The raw outputs never leave the site: the server sees them only
added to clipped gradients and averaged over steps.

``reproducible_seed`` exists for experiments that must be repeated bit for bit. It is **not
private against the server** (anyone with the config can rebuild the noise), and every place
that uses it says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

NOT_PRIVATE_AGAINST_THE_SERVER = (
    "reproducible-noise is on: noise and sampling are seeded from the run config, so this run is "
    "NOT PRIVATE AGAINST THE SERVER (anyone with the config can rebuild the noise); use it for "
    "experiments only, never in a deployment"
)


def gaussian_noise(
    shape: torch.Size | tuple[int, ...], *, std: float, generator: torch.Generator, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """N(0, std^2) drawn as DP training draws it, with Opacus' ``secure_mode`` (four Gaussians summed
    and halved, the first draw thrown away): for every noised release, not only the optimizer's."""
    from opacus.optimizers.optimizer import _generate_noise  # the optimizer's own draw, not a copy of it

    return _generate_noise(std, torch.zeros(shape, device=device), generator=generator, secure_mode=True)


def os_seed() -> int:
    """A fresh 63-bit seed from the operating system's entropy pool."""
    return int.from_bytes(os.urandom(8), "big") >> 1


@dataclass(frozen=True)
class SiteRandomness:
    """The two generators one stretch of local training draws from, and whether they are secret."""

    sampler: torch.Generator
    noise: torch.Generator
    secret: bool


def site_randomness(*, device: torch.device, reproducible_seed: int | None = None) -> SiteRandomness:
    """OS-seeded generators (the default), or generators from ``reproducible_seed`` (not private)."""
    if reproducible_seed is None:
        return SiteRandomness(
            sampler=torch.Generator().manual_seed(os_seed()),
            noise=torch.Generator(device=device).manual_seed(os_seed()),
            secret=True,
        )
    if reproducible_seed < 0:
        raise ValueError(f"seed: expected an integer >= 0, got {reproducible_seed}")
    return SiteRandomness(
        sampler=torch.Generator().manual_seed(reproducible_seed),
        noise=torch.Generator(device=device).manual_seed(reproducible_seed + 1),
        secret=False,
    )


def reproducible_site_seed(*, seed: int, round_: int, site: str) -> int:
    """The seed of one site and round in reproducible mode: public by construction."""
    return seed * 100_003 + round_ * 1009 + sum(map(ord, site))
