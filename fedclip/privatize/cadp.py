"""Content-aware DP (CADP, Toelle et al. 2022), corrected: encode, clip, noise, decode.

x' = clamp(f^-1(clip_s(f(x; y)) + noise; y'), 0, 1), with f the conditional INN trained on public
images (``fedclip.privatize.inn``). What is released for an image is x' (and y' if decoding uses
a label); everything after that (training, the federation) is post-processing.

The label. The published code decodes with the true label, unnoised: that releases the label
outside any accounting. Here ``label = "none"`` decodes with the INN's ``unknown`` label (no
label released; encoding may still use the true one, since encoding happens before the noise),
and ``label = "rr"`` releases y' by k-ary randomized response with ``label_epsilon`` per image
(keep the label with probability e^eps / (e^eps + K - 1), else a uniformly random other one) and
decodes with it. The unit's epsilon is then the latent mechanism's epsilon at delta plus
k * label_epsilon (basic composition: an upper bound).

What the guarantee covers: the *images* of a unit (local, replace-one: ``fedclip.privatize.latent``).
Not the reports: text paired with a privatized image (a report naming the patient, say) is
released as it is, so CADP alone does not hide that a patient is in the data; it hides what they
look like, which is what IDIA links a name to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from enum import StrEnum

import torch

from fedclip.privatize.inn import ConditionalInn
from fedclip.privatize.latent import LatentNoise, Mechanism, calibrate_latent_noise, latent_epsilon, privatize_latents


class LabelRelease(StrEnum):
    NONE = "none"
    RANDOMIZED_RESPONSE = "rr"


@dataclass(frozen=True, kw_only=True)
class CadpConfig:
    """``target_epsilon``: per unit of ``images_per_unit`` images, label release included.

    ``radius`` 0 (the default) means s = 1 / noise multiplier: the noise is then a standard
    normal latent, which the INN decodes into a plausible image. Epsilon depends only on the
    ratio of noise to radius, so s moves the balance between the clipped latent (the content,
    norm <= s) and the noise (norm about multiplier * s * sqrt(D)) not at all: in D dimensions
    (3,072 for 32 x 32 RGB) the signal-to-noise ratio is 1 / (multiplier * sqrt(D)) whatever s is.
    What s chooses is where decoding happens; 1/multiplier puts it where the INN was trained.
    """

    target_epsilon: float
    delta: float = 1e-5
    mechanism: Mechanism = Mechanism.GAUSSIAN
    radius: float = 0.0
    label: LabelRelease = LabelRelease.NONE
    label_epsilon: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mechanism", Mechanism(self.mechanism))
        object.__setattr__(self, "label", LabelRelease(self.label))
        if not (self.target_epsilon > 0 and math.isfinite(self.target_epsilon)):
            raise ValueError(f"cadp epsilon: expected a finite value > 0, got {self.target_epsilon}")
        if not (self.radius >= 0 and math.isfinite(self.radius)):
            raise ValueError(
                f"cadp radius: expected a finite radius > 0, or 0 for 1 / noise multiplier, got {self.radius}"
            )
        if not 0 < self.delta < 1:
            raise ValueError(f"cadp delta: expected a value in (0, 1), got {self.delta}")
        if self.label == LabelRelease.RANDOMIZED_RESPONSE and not self.label_epsilon > 0:
            raise ValueError(
                f"cadp label-epsilon: randomized response needs an epsilon > 0 per image, got {self.label_epsilon}"
            )
        if self.label == LabelRelease.NONE and self.label_epsilon:
            raise ValueError("cadp label-epsilon: set only with label = 'rr' (no label is released with 'none')")

    def noise_for(self, images_per_unit: int) -> LatentNoise:
        """The latent noise that leaves room for the label's share of the unit's epsilon."""
        latent_budget = self.target_epsilon - images_per_unit * self.label_epsilon
        if latent_budget <= 0:
            raise ValueError(
                f"cadp label-epsilon: {images_per_unit} images x {self.label_epsilon} leaves nothing of "
                f"epsilon {self.target_epsilon} for the images"
            )
        noise = calibrate_latent_noise(
            self.mechanism,
            target_epsilon=latent_budget,
            delta=self.delta,
            images=images_per_unit,
            radius=self.radius or 1.0,
        )
        return noise if self.radius else replace(noise, radius=1.0 / noise.noise_multiplier)

    def unit_epsilon(self, noise: LatentNoise, images_per_unit: int) -> float:
        return latent_epsilon(noise, images=images_per_unit, delta=self.delta) + images_per_unit * self.label_epsilon


def randomized_response(
    labels: torch.Tensor, *, classes: int, epsilon: float, generator: torch.Generator
) -> torch.Tensor:
    """k-ary randomized response: each label kept with probability e^eps / (e^eps + K - 1)."""
    keep = math.exp(epsilon) / (math.exp(epsilon) + classes - 1)
    flip = torch.rand(len(labels), generator=generator) >= keep
    other = (
        labels + torch.randint(1, classes, (len(labels),), generator=generator)
    ) % classes  # uniform among the rest
    return torch.where(flip, other, labels)


@torch.no_grad()
def privatize_images(
    inn: ConditionalInn,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    config: CadpConfig,
    noise: LatentNoise,
    generator: torch.Generator,
    batch_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Privatized images in [0, 1] and the labels they were decoded with (``unknown`` for 'none')."""
    if images.shape[1:] != (inn.config.channels, inn.config.image_size, inn.config.image_size):
        raise ValueError(
            f"images: expected [N, {inn.config.channels}, {inn.config.image_size}, {inn.config.image_size}] "
            f"(the INN's size), got {list(images.shape)}"
        )
    if config.label == LabelRelease.RANDOMIZED_RESPONSE:
        released = randomized_response(
            labels, classes=inn.config.classes, epsilon=config.label_epsilon, generator=generator
        )
    else:
        released = torch.full_like(labels, inn.unknown)
    out = []
    for start in range(0, len(images), batch_size):
        sl = slice(start, start + batch_size)
        z, _ = inn.encode(images[sl], labels[sl])
        out.append(inn.decode(privatize_latents(z, noise=noise, generator=generator), released[sl]).clamp(0, 1))
    return torch.cat(out) if out else images.clone(), released


STATEMENT = (
    "CADP, local, replace-one, per {unit}: any two {units} with the same number of training images give "
    "(epsilon, delta)-indistinguishable privatized images (and released labels). Not covered: the reports "
    "paired with the images (released as they are, names included), the number of images, and that a "
    "{unit} is in the data."
)


class CadpPrivatizer:
    """``privatizer(images, rows, images_per_unit=k, generator=g) -> (images, report)``."""

    name = "cadp"

    def __init__(self, inn: ConditionalInn, config: CadpConfig, *, noise: LatentNoise | None = None):
        """``noise``: as planned by the server (calibrated the same way), else calibrated here."""
        self.inn, self.config, self.noise = inn, config, noise

    def __call__(
        self, images: torch.Tensor, rows, *, images_per_unit: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict]:
        c = self.config
        noise = self.noise or c.noise_for(images_per_unit)
        labels = self.inn.config.label_indices(rows["condition"])
        private, _ = privatize_images(self.inn, images, labels, config=c, noise=noise, generator=generator)
        return private, {
            "epsilon": c.unit_epsilon(noise, images_per_unit),
            "delta": c.delta if c.mechanism == Mechanism.GAUSSIAN else 0.0,
            "noise": str(c.mechanism),
            "radius": noise.radius,
            "noise_multiplier": noise.noise_multiplier,
            "label": str(c.label),
            "label_epsilon": c.label_epsilon,
            "statement": STATEMENT,
        }
