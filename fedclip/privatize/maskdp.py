"""MaskDP (after Schneider et al. 2024): privatize only the sensitive region of each image.

Each image comes with a mask (white: sensitive; the synthetic generator emits the patch that
carries a patient's look, a user's manifest names a file per row in its ``mask`` column). Two
ways to treat the region, everything outside it kept as it is:

- ``noise``: the masked pixels, centred on the neutral grey, are clipped as one vector to norm
  <= s (L2 for Gaussian, L1 for Laplace) and noised, per image on its own.
  **Guarantee, exactly:** for any two images that are equal outside the mask and share the mask,
  the outputs are (epsilon, delta)-indistinguishable (replace-one within the region: the clipped
  vectors differ by at most 2s, the same mechanism and accounting as CADP's latent,
  ``fedclip.privatize.latent``), composed over a unit's images. **Not protected:** anything
  outside the mask (identity cues there included), the mask itself (its shape and place are
  released and may identify: the generator draws the patch's place per patient), the reports,
  and that a unit is in the data. The published MaskDP gave no accounting; this is our statement.
- ``replace``: the masked pixels are replaced by those of a public image (a stand-in person).
  Anonymization: nothing from inside the mask is released, and no epsilon is claimed, since what
  remains outside the mask is released untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import pandas as pd
import torch
from PIL import Image

from fedclip.data.schema import MASK_COLUMN
from fedclip.privatize.latent import LatentNoise, Mechanism, calibrate_latent_noise, latent_epsilon, privatize_latents

NEUTRAL = 0.5


class MaskMethod(StrEnum):
    NOISE = "noise"
    REPLACE = "replace"


def load_masks(rows: pd.DataFrame, *, size: int) -> torch.Tensor:
    """[N, size, size] booleans, True where sensitive; a row without a mask is an error naming its line."""
    if MASK_COLUMN not in rows.columns:
        raise ValueError("mask: the manifest has no 'mask' column; MaskDP needs a mask image per training row")
    masks = []
    for path, line in zip(rows[MASK_COLUMN], rows.get("line", pd.Series([None] * len(rows)))):
        if not path:
            raise ValueError(f"mask: manifest line {line} has no mask; every row MaskDP privatizes needs one")
        with Image.open(path) as img:
            img = img.convert("L")
            if img.size != (size, size):
                img = img.resize((size, size), Image.NEAREST)
            masks.append(torch.from_numpy(np.asarray(img) > 127))
    return torch.stack(masks)


def noise_masked(
    images: torch.Tensor, masks: torch.Tensor, *, noise: LatentNoise, generator: torch.Generator
) -> torch.Tensor:
    """Clip each image's masked region (one vector per image) and add noise there only."""
    region = masks[:, None].expand_as(images)  # the same pixels in every channel
    centred = ((images - NEUTRAL) * region).flatten(1)  # zero outside the mask: contributes no norm
    private = privatize_latents(centred, noise=noise, generator=generator).view_as(images) + NEUTRAL
    return torch.where(region, private, images).clamp(0, 1)


def replace_masked(
    images: torch.Tensor, masks: torch.Tensor, *, stand_ins: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Each image's masked pixels from a random public stand-in image."""
    if not len(stand_ins):
        raise ValueError("stand-ins: replacing needs public images to take stand-ins from")
    pick = torch.randint(0, len(stand_ins), (len(images),), generator=generator)
    return torch.where(masks[:, None].expand_as(images), stand_ins[pick], images)


STATEMENTS = {
    MaskMethod.NOISE: (
        "MaskDP, local, replace-one within the mask, per {unit}: two {units} whose training images are "
        "equal outside their (shared) masks give (epsilon, delta)-indistinguishable images. Not "
        "covered: pixels outside the mask, the mask itself (shape and place, which may identify), "
        "the reports, the number of images, and that a {unit} is in the data."
    ),
    MaskMethod.REPLACE: (
        "MaskDP replace, anonymization without an epsilon: inside each mask, a public stand-in's pixels; "
        "outside it, the original, released as it is (as are the mask, the reports and the number "
        "of images)."
    ),
}


@dataclass(frozen=True, kw_only=True)
class MaskDpConfig:
    """``noise``: ``target_epsilon`` per unit at ``delta``, masked region clipped to ``radius``;
    ``replace``: no epsilon (leave it 0)."""

    method: MaskMethod = MaskMethod.NOISE
    target_epsilon: float = 0.0
    delta: float = 1e-5
    mechanism: Mechanism = Mechanism.GAUSSIAN
    radius: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", MaskMethod(self.method))
        object.__setattr__(self, "mechanism", Mechanism(self.mechanism))
        if self.method == MaskMethod.NOISE and not (self.target_epsilon > 0 and math.isfinite(self.target_epsilon)):
            raise ValueError(f"maskdp epsilon: expected a finite value > 0, got {self.target_epsilon}")
        if self.method == MaskMethod.REPLACE and self.target_epsilon:
            raise ValueError("maskdp epsilon: 'replace' is anonymization and claims no epsilon; leave it 0")
        if not (self.radius > 0 and math.isfinite(self.radius)):
            raise ValueError(f"maskdp radius: expected a finite value > 0, got {self.radius}")


class MaskPrivatizer:
    """``privatizer(images, rows, images_per_unit=k, generator=g) -> (images, report)``."""

    def __init__(
        self, config: MaskDpConfig, *, stand_ins: torch.Tensor | None = None, noise: LatentNoise | None = None
    ):
        """``noise``: as planned by the server (calibrated the same way), else calibrated here."""
        self.config, self.stand_ins, self.noise = config, stand_ins, noise
        self.name = f"maskdp-{config.method}"

    def __call__(
        self, images: torch.Tensor, rows: pd.DataFrame, *, images_per_unit: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict]:
        masks = load_masks(rows, size=images.shape[-1])
        c = self.config
        if c.method == MaskMethod.REPLACE:
            out = replace_masked(
                images,
                masks,
                stand_ins=self.stand_ins if self.stand_ins is not None else images[:0],
                generator=generator,
            )
            return out, {"epsilon": None, "delta": None, "statement": STATEMENTS[c.method]}
        noise = self.noise or calibrate_latent_noise(
            c.mechanism, target_epsilon=c.target_epsilon, delta=c.delta, images=images_per_unit, radius=c.radius
        )
        out = noise_masked(images, masks, noise=noise, generator=generator)
        return out, {
            "epsilon": latent_epsilon(noise, images=images_per_unit, delta=c.delta),
            "delta": c.delta if c.mechanism == Mechanism.GAUSSIAN else 0.0,
            "noise": str(c.mechanism),
            "radius": noise.radius,
            "noise_multiplier": noise.noise_multiplier,
            "statement": STATEMENTS[c.method],
        }
