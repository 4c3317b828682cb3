"""Image-text retrieval recall@k over a held-out set of pairs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedclip.data.tensors import PairData
from fedclip.evaluation.encode import encode_images, encode_texts


def retrieval_recall(model: torch.nn.Module, data: PairData, *, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``image_to_text_r{k}`` and ``text_to_image_r{k}``: how often pair i's partner ranks in the top k."""
    if any(k < 1 for k in ks):
        raise ValueError(f"ks: every k must be >= 1, got {list(ks)}")
    sims = encode_images(model, data.images) @ encode_texts(model, data.tokens).T
    truth = torch.arange(len(data), device=sims.device)
    out: dict[str, float] = {}
    for direction, matrix in (("image_to_text", sims), ("text_to_image", sims.T)):
        # rank = other candidates scoring at least as high as the true partner (ties count
        # against the model, so a collapsed embedding cannot score)
        rank = (matrix >= matrix[truth, truth][:, None]).sum(dim=1) - 1
        for k in ks:
            out[f"{direction}_r{k}"] = float((rank < k).float().mean())
    return out
