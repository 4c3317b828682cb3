"""An input-level privatization as a federation plans it: once per site, then post-processing.

The server calibrates the noise from the run's target epsilon for a unit of ``images_per_unit``
images (declared, not counted: the largest patient's number of images is data) and sends this
plan; a site privatizes its own training images once with its own OS randomness, charges the
release event in its ledger before touching the data, and keeps the result in its state folder
so that no later round releases again (a site that lost its copy releases, and is charged, again).
Training on the privatized images adds nothing: its event has no steps. ``mask-replace`` claims
no epsilon, so its training is charged as what it is, non-private training.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedclip.privacy.events import DpEvent, PrivacyUnit
from fedclip.privacy.modes import INPUT_MODES
from fedclip.privatize.latent import LatentNoise, Mechanism, calibrate_latent_noise, latent_event


@dataclass(frozen=True, kw_only=True)
class InputPlan:
    method: str
    noise_multiplier: float  # of the Gaussian over the radius; 0 for mask-replace
    radius: float
    images_per_unit: int
    image_size: int
    inn_checkpoint: str = ""  # cadp: the public INN

    def __post_init__(self) -> None:
        if self.method not in INPUT_MODES:
            raise ValueError(f"input privacy: expected one of {INPUT_MODES}, got {self.method!r}")
        if self.images_per_unit < 1:
            raise ValueError(f"input-images-per-unit: expected an integer >= 1, got {self.images_per_unit}")
        if self.method == "cadp" and not self.inn_checkpoint:
            raise ValueError("inn checkpoint: cadp needs the public INN")

    @property
    def claims_epsilon(self) -> bool:
        return self.method != "mask-replace"

    @property
    def noise(self) -> LatentNoise:
        return LatentNoise(mechanism=Mechanism.GAUSSIAN, radius=self.radius, noise_multiplier=self.noise_multiplier)

    def release_event(self, unit: PrivacyUnit | str) -> DpEvent | None:
        """The one-time release of a unit's images (None: no epsilon claimed)."""
        return (
            latent_event(self.noise, images=self.images_per_unit, privacy_unit=PrivacyUnit(unit))
            if self.claims_epsilon
            else None
        )

    @classmethod
    def calibrated(
        cls,
        method: str,
        *,
        target_epsilon: float,
        delta: float,
        images_per_unit: int,
        radius: float,
        image_size: int,
        inn_checkpoint: str = "",
    ) -> "InputPlan":
        """Gaussian noise for ``target_epsilon`` per unit; radius 0: CADP's 1 / multiplier, MaskDP's 1."""
        if method == "mask-replace":
            return cls(
                method=method,
                noise_multiplier=0.0,
                radius=radius or 1.0,
                images_per_unit=images_per_unit,
                image_size=image_size,
            )
        if method == "cadp":
            from fedclip.privatize.cadp import CadpConfig  # the INN's modules load only where CADP runs

            noise = CadpConfig(target_epsilon=target_epsilon, delta=delta, radius=radius).noise_for(images_per_unit)
        else:
            noise = calibrate_latent_noise(
                Mechanism.GAUSSIAN,
                target_epsilon=target_epsilon,
                delta=delta,
                images=images_per_unit,
                radius=radius or 1.0,
            )
        return cls(
            method=method,
            noise_multiplier=noise.noise_multiplier,
            radius=noise.radius,
            images_per_unit=images_per_unit,
            image_size=image_size,
            inn_checkpoint=inn_checkpoint,
        )

    def to_record(self) -> dict[str, Any]:
        return {
            "input-privacy": self.method,
            "input-noise-multiplier": self.noise_multiplier,
            "input-radius-resolved": self.radius,
            "input-images-per-unit": self.images_per_unit,
            "input-image-size": self.image_size,
            "inn-checkpoint": self.inn_checkpoint,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "InputPlan | None":
        if not str(record.get("input-privacy", "")):
            return None
        return cls(
            method=str(record["input-privacy"]),
            noise_multiplier=float(record["input-noise-multiplier"]),
            radius=float(record["input-radius-resolved"]),
            images_per_unit=int(record["input-images-per-unit"]),
            image_size=int(record["input-image-size"]),
            inn_checkpoint=str(record.get("inn-checkpoint", "")),
        )
