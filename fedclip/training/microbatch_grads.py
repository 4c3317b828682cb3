"""Gradients of many micro-batches' contrastive losses at once, for per-micro-batch clipping.

CLIP's loss couples every pair of a batch, so per-sample gradients do not exist; DP-CLIP clips
the gradient of a whole micro-batch instead. The micro-batches are padded to one size and
stacked, and ``torch.func.vmap(grad(...))`` computes every micro-batch's gradient in one
vectorised call. Padded pairs are masked out of the loss, so each gradient equals that of the
unpadded micro-batch. The result has the layout of Opacus' ``p.grad_sample`` (one row per
micro-batch), which is what ``DPOptimizer`` clips, sums and noises.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from fedclip.training.loss import group_loss
from fedclip.training.negative_bank import NegativeBank


def pad_groups(groups: Sequence[np.ndarray | Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """[K, m] record indices (padding points at record 0) and the [K, m] validity mask."""
    width = max((len(g) for g in groups), default=0) or 1
    index = torch.zeros(len(groups), width, dtype=torch.long)
    valid = torch.zeros(len(groups), width, dtype=torch.bool)
    for k, g in enumerate(groups):
        index[k, : len(g)] = torch.as_tensor(np.asarray(g), dtype=torch.long)
        valid[k, : len(g)] = True
    return index, valid


def stacked_groups(
    groups: Sequence[np.ndarray | Sequence[int]], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's groups as one batch, for the engines that run every pair at once: ``records``
    [n] (the pairs' data indices, group after group), ``position`` and ``valid`` [K, m] (each
    group's places in that batch, padded; ``pad_groups``) and ``owner`` [n] (each pair's group)."""
    sizes = [len(g) for g in groups]
    records = torch.as_tensor(np.concatenate([np.asarray(g, dtype=np.int64) for g in groups]), dtype=torch.long)
    offsets = np.cumsum([0, *sizes])
    position, valid = pad_groups([np.arange(offsets[i], offsets[i + 1]) for i in range(len(groups))])
    owner = torch.repeat_interleave(torch.arange(len(groups)), torch.as_tensor(sizes))
    return records, position.to(device), valid.to(device), owner.to(device)


def per_microbatch_grads(
    model: torch.nn.Module,
    groups: Sequence[np.ndarray | Sequence[int]],
    images: torch.Tensor,
    tokens: torch.Tensor,
    *,
    chunk_size: int | None = None,
    bank: NegativeBank | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-micro-batch gradients of the trainable parameters, ``{name: [K, *shape]}``, and the
    K micro-batch losses. ``chunk_size`` bounds how many micro-batches vmap holds at once.
    With ``bank``, each group's loss is contrasted against the bank's public negatives too."""
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("trainable: the model has no trainable parameters")
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update(dict(model.named_buffers()))
    if len(groups) == 0:
        return {
            n: torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device) for n, p in trainable.items()
        }, torch.zeros(0)
    device = next(iter(trainable.values())).device
    index, valid = pad_groups(groups)
    index, valid = index.to(device), valid.to(device)
    batch_images = images.to(device)[index]
    batch_tokens = tokens.to(device)[index]

    def loss_of_one(params: dict[str, torch.Tensor], img: torch.Tensor, tok: torch.Tensor, ok: torch.Tensor):
        image_f, text_f, scale = functional_call(model, (params, fixed), (img, tok))
        loss = group_loss(image_f, text_f, scale, ok, bank=bank)
        return loss, loss.detach()

    grads, losses = vmap(grad(loss_of_one, has_aux=True), in_dims=(None, 0, 0, 0), chunk_size=chunk_size)(
        trainable, batch_images, batch_tokens, valid
    )
    return grads, losses
