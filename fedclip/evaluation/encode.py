"""Batched, gradient-free encoding of images and texts into normalised embeddings."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


@torch.no_grad()
def _encode(
    model: torch.nn.Module, encoder: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, batch_size: int
) -> torch.Tensor:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [
        F.normalize(encoder(inputs[i : i + batch_size].to(device)), dim=-1) for i in range(0, len(inputs), batch_size)
    ]
    model.train(was_training)
    return torch.cat(out)


def encode_images(model: torch.nn.Module, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    return _encode(model, model.encode_image, images, batch_size)


def encode_texts(model: torch.nn.Module, tokens: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    return _encode(model, model.encode_text, tokens, batch_size)
