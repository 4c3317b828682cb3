"""CLIP's symmetric contrastive loss, with an optional validity mask for padded micro-batches."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from fedclip.training.negative_bank import NegativeBank


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy over the valid pairs.

    ``valid`` (bool, shape [m]) marks real pairs in a padded micro-batch: padded pairs are
    neither anchors nor negatives, so the loss equals the unpadded micro-batch's loss exactly.
    """
    logits = logit_scale * image_features @ text_features.T
    target = torch.arange(logits.shape[0], device=logits.device)
    if valid is None:
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    keep = valid[None, :] & valid[:, None]
    logits = logits.masked_fill(~keep, torch.finfo(logits.dtype).min / 4)
    weight = valid.to(logits.dtype)
    per_row = F.cross_entropy(logits, target, reduction="none") + F.cross_entropy(logits.T, target, reduction="none")
    return 0.5 * (per_row * weight).sum() / weight.sum().clamp_min(1.0)


def clip_loss_with_bank(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    valid: torch.Tensor,
    bank_images: torch.Tensor,
    bank_texts: torch.Tensor,
) -> torch.Tensor:
    """One unit's contrastive loss against its own pairs and a fixed bank of public negatives.

    Each valid image is scored against the unit's valid captions and every bank caption (and each
    caption against the unit's images and the bank images); the target is its own partner. The bank
    holds constants computed from public data, so the loss, and its gradient, depend on this
    unit's pairs alone: that is what makes per-unit clipping a per-unit sensitivity bound.
    """
    m = image_features.shape[0]
    texts = torch.cat([text_features, bank_texts.to(text_features.dtype)])
    images = torch.cat([image_features, bank_images.to(image_features.dtype)])
    keep = torch.cat([valid, torch.ones(bank_texts.shape[0], dtype=torch.bool, device=valid.device)])
    fill = torch.finfo(image_features.dtype).min / 4
    logits_it = (logit_scale * image_features @ texts.T).masked_fill(~keep[None, :], fill)
    logits_ti = (logit_scale * text_features @ images.T).masked_fill(~keep[None, :], fill)
    target = torch.arange(m, device=image_features.device)
    per_row = F.cross_entropy(logits_it, target, reduction="none") + F.cross_entropy(
        logits_ti, target, reduction="none"
    )
    weight = valid.to(per_row.dtype)
    return 0.5 * (per_row * weight).sum() / weight.sum().clamp_min(1.0)


def group_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    bank: "NegativeBank | None" = None,
) -> torch.Tensor:
    """One group's (micro-batch's or unit's) loss, the one place that chooses: its own pairs only
    (``clip_loss``), or also against a public negative bank (``clip_loss_with_bank``, unit mode).
    Every gradient engine calls this, so they differentiate the same function."""
    if bank is None:
        return clip_loss(image_features, text_features, logit_scale, valid)
    if valid is None:
        valid = torch.ones(image_features.shape[0], dtype=torch.bool, device=image_features.device)
    device = image_features.device
    return clip_loss_with_bank(
        image_features, text_features, logit_scale, valid, bank.images.to(device), bank.texts.to(device)
    )
