"""LoRA adapters on both towers of an open_clip CLIP, added with peft.

LoRA (Hu et al. 2021) trains a low-rank update ``B A`` (A: rank x in, B: out x rank, B starting
at zero) beside a frozen weight; under DP it matches full fine-tuning at a fraction of the noised
coordinates (Yu et al. 2022, arXiv 2110.06500). peft adds the adapters (``inject_adapter_in_model``)
as two ``nn.Linear`` layers per target (``lora_A``, ``lora_B``), whose per-sample gradients Opacus
knows, so every gradient engine (ghost norms, hooks, vmap) handles them like any linear layer.

peft cannot hook open_clip's attention: ``nn.MultiheadAttention`` keeps q/k/v in one fused
parameter and never calls ``out_proj`` as a module (peft's own MultiheadAttention support merges
the weights around each forward, which per-sample hooks cannot see). So for ``attn`` targets the
model's attention layers are first converted to separate q/k/v/out ``Linear`` layers holding
copies of the same weights (``fedclip.models.attention.split_attention``: same outputs), and
peft adds adapters to those. The frozen base weights are then named ``...attn.qlinear.base_layer.weight``
(and ``...mlp.c_fc.base_layer.weight``): load pretrained weights *before* adding adapters, as
``create_model`` does. Scaling is ``alpha / rank`` with ``alpha = rank`` (1): the learning rate
carries the rest.
"""

from __future__ import annotations

import re

from torch import nn

from fedclip.models.attention import split_attention
from fedclip.models.trainable import ADAPTER, TrainableSpec

_PATTERNS = {
    "attn": r"attn\.(?:qlinear|klinear|vlinear|out_proj)",
    "mlp": r"mlp\.(?:c_fc|c_proj)",
}
_BLOCK = r"(?:visual\.)?transformer\.resblocks\.\d+"  # a block of either tower, by module name


def add_lora(model: nn.Module, spec: TrainableSpec) -> list[str]:
    """Add ``spec``'s adapters (rank and targets, checked by ``TrainableSpec.parse``) to every
    transformer block of both towers; return the adapters' parameter names. Only the adapters are
    trainable after."""
    from peft import LoraConfig, inject_adapter_in_model  # 3-4 s to import: only when LoRA is used

    if spec.mode != "lora":
        raise ValueError(f"trainable: add_lora needs a 'lora-R' spec, got mode {spec.mode!r}")
    rank, targets = spec.lora_rank, spec.lora_targets
    blocks = [n for n, _ in model.named_modules() if re.fullmatch(_BLOCK, n)]
    towers = {("vision" if n.startswith("visual.") else "text") for n in blocks}
    if towers != {"vision", "text"}:
        raise ValueError(
            f"trainable: LoRA needs transformer blocks in both towers; {type(model).__name__} has them in "
            f"{sorted(towers) or 'neither'}"
        )
    if "attn" in targets:
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.MultiheadAttention):
                    setattr(parent, child_name, split_attention(child))
    pattern = rf"{_BLOCK}\.(?:{'|'.join(_PATTERNS[t] for t in targets)})"
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=pattern, bias="none")
    inject_adapter_in_model(config, model)
    names = [n for n, _ in model.named_parameters() if ADAPTER.search(n)]
    if not names:
        raise ValueError(f"trainable: no module of this model matches the LoRA targets {list(targets)}")
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    return names
