"""A bank of public negatives for per-unit contrastive losses.

CLIP's loss needs negatives, and negatives drawn from other patients would couple their data to
each other's gradients. The bank is built from the *public* population (never from a site's
private rows), encoded by the model the round starts from (which the server already holds), and
kept fixed for the round: refreshed on a data-independent schedule, it is a constant to every
unit's gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedclip.data.tensors import PairData


@dataclass(frozen=True)
class NegativeBank:
    images: torch.Tensor  # [B, d] normalised image embeddings of public pairs
    texts: torch.Tensor  # [B, d] normalised caption embeddings of the same pairs

    def __len__(self) -> int:
        return int(self.images.shape[0])


@torch.no_grad()
def build_negative_bank(
    model: torch.nn.Module, public: PairData, *, size: int, generator: torch.Generator | None = None, batch: int = 256
) -> NegativeBank:
    """Encode ``size`` public pairs (a random subset; the choice is public) with ``model`` as it is now."""
    if size < 1:
        raise ValueError(f"negative-bank-size: expected an integer >= 1, got {size}")
    if len(public) < 1:
        raise ValueError("negative bank: no public pairs to draw negatives from")
    pick = torch.randperm(len(public), generator=generator)[: min(size, len(public))]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    images, texts = [], []
    for start in range(0, len(pick), batch):
        idx = pick[start : start + batch]
        image_f, text_f, _ = model(public.images[idx].to(device), public.tokens[idx].to(device))
        images.append(image_f.detach())
        texts.append(text_f.detach())
    model.train(was_training)
    return NegativeBank(images=torch.cat(images), texts=torch.cat(texts))
