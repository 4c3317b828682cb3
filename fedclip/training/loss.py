"""CLIP's symmetric contrastive loss, with an optional validity mask for padded micro-batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
