"""Zero-shot condition classification with prompt ensembling (the utility task)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from fedclip.data.schema import CONDITIONS
from fedclip.data.tensors import PairData
from fedclip.evaluation.encode import encode_images, encode_texts

PROMPT_TEMPLATES: tuple[str, ...] = (
    "a chest x-ray showing {}.",
    "findings: {}.",
    "a radiograph with {}.",
    "impression: {}.",
    "a scan of a patient with {}.",
)


@torch.no_grad()
def class_embeddings(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
) -> torch.Tensor:
    """One embedding per class: the normalised mean of its prompts' embeddings."""
    rows = []
    for name in classnames:
        emb = encode_texts(model, tokenizer([t.format(name) for t in templates]))
        rows.append(F.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(rows)


def zero_shot_accuracy(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    data: PairData,
    *,
    classnames: Sequence[str] = CONDITIONS,
    templates: Sequence[str] = PROMPT_TEMPLATES,
) -> float:
    """Fraction of images whose nearest class embedding is their condition."""
    unknown = sorted(set(data.conditions) - set(classnames))
    if unknown:
        raise ValueError(f"condition: labels {unknown[:5]} are not among the classes {list(classnames)}")
    classes = class_embeddings(model, tokenizer, classnames, templates)
    pred = (encode_images(model, data.images) @ classes.T).argmax(dim=1)
    truth = torch.tensor([list(classnames).index(c) for c in data.conditions], device=pred.device)
    return float((pred == truth).float().mean())
