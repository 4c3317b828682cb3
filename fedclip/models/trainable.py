"""Which parameters fine-tuning updates: all, the projections only, or the last k blocks.

Training fewer parameters is one of the main levers on utility under DP (less noise dimension
for the same clipping norm), so it is a first-class setting rather than an afterthought.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# Parameters that map each tower's output into the shared embedding space, and the temperature.
PROJECTIONS = ("visual.proj", "text_projection", "text.text_projection", "logit_scale", "logit_bias")
# Final layer norms follow the last block and are trained with it.
_FINAL_NORMS = ("visual.ln_post.", "ln_final.", "text.ln_final.")
_TOWERS = {
    "vision": re.compile(r"^visual\.transformer\.resblocks\.(\d+)\."),
    "text": re.compile(r"^(?:text\.)?transformer\.resblocks\.(\d+)\."),
}


@dataclass(frozen=True)
class TrainableSpec:
    """``all``, ``projections`` or ``last-K`` (K >= 1 blocks of each tower, plus projections)."""

    mode: str
    last_k: int = 0

    @classmethod
    def parse(cls, text: str) -> "TrainableSpec":
        if text in ("all", "projections"):
            return cls(mode=text)
        match = re.fullmatch(r"last-(\d+)", text)
        if match and int(match.group(1)) >= 1:
            return cls(mode="last", last_k=int(match.group(1)))
        raise ValueError(f"trainable: expected 'all', 'projections' or 'last-K' with K >= 1, got {text!r}")


def _selected(names: list[str], spec: TrainableSpec) -> set[str]:
    if spec.mode == "all":
        return set(names)
    chosen = {n for n in names if n in PROJECTIONS}
    if not chosen:
        raise ValueError("trainable: this architecture has no visual.proj / text_projection to train")
    if spec.mode == "projections":
        return chosen
    for tower, pattern in _TOWERS.items():
        blocks = sorted({int(m.group(1)) for n in names if (m := pattern.match(n))})
        if not blocks:
            raise ValueError(f"trainable: last-K needs transformer blocks; the {tower} tower has none")
        if spec.last_k > len(blocks):
            raise ValueError(f"trainable: last-{spec.last_k} but the {tower} tower has {len(blocks)} blocks")
        keep = set(blocks[-spec.last_k :])
        chosen |= {n for n in names if (m := pattern.match(n)) and int(m.group(1)) in keep}
    chosen |= {n for n in names if n.startswith(_FINAL_NORMS)}
    return chosen


def apply_trainable(model: torch.nn.Module, spec: TrainableSpec) -> list[str]:
    """Set ``requires_grad`` per the spec; return the names of the trainable parameters."""
    names = [n for n, _ in model.named_parameters()]
    chosen = _selected(names, spec)
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    return [n for n in names if n in chosen]
