"""Statistics a site may release beside its update, each through an accounted Gaussian mechanism.

By default a site's reply carries its update, its privacy events and values fixed before
training (a declared public weight): nothing else. A user who wants to see the training loss or
the site's size asks for them here, and each release is a privacy event in the same ledger.

**Loss** (sensitivity argument). After training, units are spread over the same keyed-hash
blocks as the micro-batches (``fedclip.privacy.microbatches``): a unit touches exactly one
block whatever other units exist. Each block's contrastive loss is clipped to ``[0, L]`` (a block
with fewer than two pairs has loss 0), the clipped losses are summed, and N(0, (sigma L)^2) is
added. Adding or removing one unit changes one block's clipped loss from a to b with
``|a - b| <= L`` and no other block, so the sum is a Gaussian mechanism with sensitivity L
(no sampling: add-or-remove and replace-one coincide). The released value is the noisy sum over
the (public) number of blocks.

**Count.** The number of units plus N(0, sigma^2): adding or removing a unit moves it by 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedclip.data.tensors import PairData
from fedclip.privacy.events import DpEvent, PrivacyUnit, Relation
from fedclip.privacy.microbatches import group_records, unit_ids
from fedclip.privacy.randomness import gaussian_noise

# the training loss of a block's pairs: (image features, text features, logit scale) -> scalar
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class ReleaseConfig:
    """``*_noise``: the noise multiplier of each release; 0 means "not released"."""

    loss_noise: float = 0.0
    loss_bound: float = 10.0
    count_noise: float = 0.0

    def __post_init__(self) -> None:
        for name in ("loss_noise", "count_noise"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(
                    f"{name.replace('_', '-')}: expected 0 (not released) or a finite value > 0, got {value}"
                )
        if not (self.loss_bound > 0 and math.isfinite(self.loss_bound)):
            raise ValueError(f"loss-bound: expected a finite value > 0, got {self.loss_bound}")


def _gaussian(noise_multiplier: float, unit: PrivacyUnit) -> DpEvent:
    """One unsampled Gaussian release with sensitivity 1 (in units of its own bound)."""
    return DpEvent(
        noise_multiplier=noise_multiplier,
        sample_rate=1.0,
        steps=1,
        privacy_unit=unit,
        relation=Relation.ADD_OR_REMOVE,
        sensitivity=1.0,
    )


def release_events(config: ReleaseConfig, *, privacy_unit: PrivacyUnit) -> tuple[DpEvent, ...]:
    """The events the configured releases cost, known before any data is touched."""
    out = []
    if config.loss_noise > 0:
        out.append(_gaussian(config.loss_noise, PrivacyUnit(privacy_unit)))
    if config.count_noise > 0:
        out.append(_gaussian(config.count_noise, PrivacyUnit(privacy_unit)))
    return tuple(out)


@torch.no_grad()
def clipped_block_losses(
    model: torch.nn.Module,
    data: PairData,
    *,
    loss_fn: LossFn,
    privacy_unit: PrivacyUnit,
    num_blocks: int,
    key: str,
    bound: float,
) -> torch.Tensor:
    """Each keyed-hash block's loss (``loss_fn(image_features, text_features, logit_scale)``, the
    training loss), clipped to [0, bound] (0 for fewer than 2 pairs)."""
    units = unit_ids(privacy_unit=privacy_unit, patient_ids=data.patient_ids, record_ids=data.record_ids)
    device = next(model.parameters()).device
    model.eval()
    out = torch.zeros(num_blocks, dtype=torch.float64)
    for b, records in enumerate(group_records(units, num_blocks=num_blocks, key=key)):
        if len(records) < 2:
            continue
        idx = torch.as_tensor(records)
        image_f, text_f, scale = model(data.images[idx].to(device), data.tokens[idx].to(device))
        out[b] = float(loss_fn(image_f, text_f, scale).clamp(0.0, bound))
    return out


def noisy_loss(
    model: torch.nn.Module,
    data: PairData,
    *,
    loss_fn: LossFn,
    config: ReleaseConfig,
    privacy_unit: PrivacyUnit,
    num_blocks: int,
    key: str,
    generator: torch.Generator,
) -> float:
    """Mean clipped block loss plus Gaussian noise of std ``loss_noise * loss_bound / num_blocks``."""
    losses = clipped_block_losses(
        model, data, loss_fn=loss_fn, privacy_unit=privacy_unit, num_blocks=num_blocks, key=key, bound=config.loss_bound
    )
    noise = gaussian_noise((1,), std=config.loss_noise * config.loss_bound, generator=generator).item()
    return (float(losses.sum()) + noise) / num_blocks


def noisy_count(
    data: PairData, *, config: ReleaseConfig, privacy_unit: PrivacyUnit, generator: torch.Generator
) -> float:
    units = set(unit_ids(privacy_unit=privacy_unit, patient_ids=data.patient_ids, record_ids=data.record_ids))
    return len(units) + gaussian_noise((1,), std=config.count_noise, generator=generator).item()
