"""Which parameters fine-tuning updates: all, the projections only, the last k blocks, the biases
only, or LoRA adapters.

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
LORA_TARGETS = ("attn", "mlp")
# LoRA adapter parameters as peft names them, e.g. "...resblocks.0.mlp.c_fc.lora_A.default.weight".
ADAPTER = re.compile(r"\.lora_[AB]\.")
_TOWERS = {
    "vision": re.compile(r"^visual\.transformer\.resblocks\.(\d+)\."),
    "text": re.compile(r"^(?:text\.)?transformer\.resblocks\.(\d+)\."),
}


@dataclass(frozen=True)
class TrainableSpec:
    """``all``, ``projections``, ``last-K`` (K >= 1 blocks of each tower, plus projections),
    ``bias`` (every bias term, DP-BiTFiT: Bu et al. 2022, arXiv 2210.00036) or ``lora-R`` (LoRA
    adapters of rank R >= 1 on the attention and MLP layers of every block of both towers;
    ``lora-R-attn`` or ``lora-R-mlp`` for one kind; ``fedclip.models.lora``)."""

    mode: str
    last_k: int = 0
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "TrainableSpec":
        if text in ("all", "projections", "bias"):
            return cls(mode=text)
        match = re.fullmatch(r"last-(\d+)", text)
        if match and int(match.group(1)) >= 1:
            return cls(mode="last", last_k=int(match.group(1)))
        match = re.fullmatch(r"lora-(\d+)(?:-(\w+))?", text)
        if match:
            rank, target = int(match.group(1)), match.group(2)
            if rank < 1:
                raise ValueError(f"trainable: {text!r} has LoRA rank {rank}; the rank must be >= 1")
            if target is not None and target not in LORA_TARGETS:
                raise ValueError(
                    f"trainable: {text!r} names LoRA target {target!r}; expected {', '.join(LORA_TARGETS)} "
                    "(or none: both)"
                )
            return cls(mode="lora", lora_rank=rank, lora_targets=(target,) if target else LORA_TARGETS)
        raise ValueError(
            "trainable: expected 'all', 'projections', 'bias', 'last-K' (K >= 1) or 'lora-R' / 'lora-R-attn' / "
            f"'lora-R-mlp' (R >= 1), got {text!r}"
        )


def _selected(names: list[str], spec: TrainableSpec) -> set[str]:
    if spec.mode == "all":
        return set(names)
    if spec.mode == "bias":
        chosen = {n for n in names if n.rsplit(".", 1)[-1] in ("bias", "in_proj_bias")}
        if not chosen:
            raise ValueError("trainable: 'bias' but this model has no bias terms")
        return chosen
    if spec.mode == "lora":
        chosen = {n for n in names if ADAPTER.search(n)}
        if not chosen:
            raise ValueError("trainable: 'lora' but the model has no LoRA adapters (add them with add_lora first)")
        return chosen
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
