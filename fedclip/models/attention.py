"""Attention with separate q/k/v ``Linear`` layers, for code that needs each projection as a module.

``nn.MultiheadAttention`` keeps q, k and v in one fused ``in_proj_weight`` and never calls its
``out_proj`` as a module, so neither per-sample hooks (Opacus) nor adapters (peft's LoRA) can
attach to them. ``SplitAttention`` has the four projections as ``Linear`` modules. The grad-sample
twin uses it with views of the model's rows; LoRA converts the model's own attention to it
(``split_attention``, copies) so that adapters attach to q, k, v and out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SplitAttention(nn.Module):
    """Multi-head attention whose q, k, v and out projections are ``Linear`` modules (as in Opacus'
    ``DPMultiheadAttention``, without its state-dict hooks, which rename q/k/v to a fused
    ``in_proj`` and so break under adapters), with the batch-first forward open_clip calls. The
    attention itself has no parameters, so SDPA computes it."""

    def __init__(self, embed_dim: int, num_heads: int, *, bias: bool, dropout: float, device=None) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"attention: width {embed_dim} is not a multiple of {num_heads} heads")
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.batch_first = True
        self.qlinear = nn.Linear(embed_dim, embed_dim, bias=bias, device=device)
        self.klinear = nn.Linear(embed_dim, embed_dim, bias=bias, device=device)
        self.vlinear = nn.Linear(embed_dim, embed_dim, bias=bias, device=device)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, device=device)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None, is_causal=False):
        if key_padding_mask is not None or need_weights or is_causal:
            raise ValueError("SplitAttention: only batch-first attention with an additive or boolean mask")
        b, length, d = query.shape
        heads = self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(b, -1, heads, d // heads).transpose(1, 2)

        q, k, v = split(self.qlinear(query)), split(self.klinear(key)), split(self.vlinear(value))
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        return self.out_proj(out.transpose(1, 2).reshape(b, length, d)), None


def attention_like(mha: nn.MultiheadAttention) -> SplitAttention:
    """An empty ``SplitAttention`` of ``mha``'s shape, on its device."""
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or not mha.batch_first:
        raise ValueError("attention: only batch-first attention with one fused in_proj and no key/value biases")
    return SplitAttention(
        mha.embed_dim,
        mha.num_heads,
        bias=mha.in_proj_bias is not None,
        dropout=mha.dropout,
        device=mha.in_proj_weight.device,
    )


def split_attention(mha: nn.MultiheadAttention) -> SplitAttention:
    """``mha`` as separate q/k/v/out ``Linear`` layers holding copies of its weights (same outputs)."""
    d = mha.embed_dim
    dp = attention_like(mha)
    with torch.no_grad():
        for i, linear in enumerate((dp.qlinear, dp.klinear, dp.vlinear)):
            linear.weight.copy_(mha.in_proj_weight[i * d : (i + 1) * d])
            if mha.in_proj_bias is not None:
                linear.bias.copy_(mha.in_proj_bias[i * d : (i + 1) * d])
        dp.out_proj.weight.copy_(mha.out_proj.weight)
        if mha.out_proj.bias is not None:
            dp.out_proj.bias.copy_(mha.out_proj.bias)
    dp.train(mha.training)
    return dp
