"""Batched, gradient-free encoding of images and texts into normalised embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def encode_images(model: torch.nn.Module, images: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [F.normalize(model.encode_image(images[i : i + batch_size].to(device)), dim=-1) for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def encode_texts(model: torch.nn.Module, tokens: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [F.normalize(model.encode_text(tokens[i : i + batch_size].to(device)), dim=-1) for i in range(0, len(tokens), batch_size)]
    model.train(was_training)
    return torch.cat(out)
