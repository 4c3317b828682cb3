"""A twin of an open_clip CLIP model that Opacus' grad-sample hooks can differentiate per sample.

Opacus computes per-sample gradients with hooks on modules it knows (Linear, LayerNorm, Conv2d,
Embedding). open_clip's CLIP has two kinds of parameters it does
not know: ``nn.MultiheadAttention``'s fused ``in_proj_weight`` and the *loose* parameters used
directly in ``forward`` (class and positional embeddings, the two projections, ``logit_scale``).

The twin shares every parameter's storage with the model (an optimizer step on the model is seen
by the twin at once) and differs only in how it applies them:

- each ``nn.MultiheadAttention`` becomes a ``SplitAttention`` (``fedclip.models.attention``) whose
  q/k/v ``Linear`` weights are views of the model's ``in_proj_weight`` rows (its ``out_proj`` is
  the model's);
- the loose parameters are applied through three small modules (``ClassToken``,
  ``PositionEmbedding``, ``MatrixProjection``) whose per-sample gradients are registered with
  Opacus' ``register_grad_sampler`` (its extension point);
- ``logit_scale`` is not a module: the loss gives each group its own copy (``group_grads``);
- the token embedding's per-sample gradients are kept as the rows of the tokens seen
  (``RowEmbedding``), not as dense [pairs, vocabulary, width] tensors.

Only the standard CLIP layout is supported (a ViT image tower with token pooling, open_clip's
text tower inside ``CLIP``); ``unsupported_reason`` says why another model is not, and the caller
falls back to the vmap reference (``microbatch_grads``). The twin's outputs are checked against
the model's own forward in the tests.
"""

from __future__ import annotations

import copy

import open_clip
import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.layer_norm import compute_layer_norm_grad_sample
from opacus.grad_sample.linear import compute_linear_grad_sample
from open_clip.transformer import LayerNorm as OpenClipLayerNorm
from open_clip.transformer import VisionTransformer
from torch import nn

from fedclip.models.attention import SplitAttention, attention_like


class ClassToken(nn.Module):
    """Prepends the (shared) class embedding to every sequence."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.weight.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)


class PositionEmbedding(nn.Module):
    """Adds the (shared) positional embedding to the first ``x.shape[1]`` positions."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight[: x.shape[1]].to(x.dtype)


class MatrixProjection(nn.Module):
    """``x @ weight`` (open_clip's ``proj`` and ``text_projection`` parameters)."""

    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class RowEmbedding(nn.Embedding):
    """The token embedding, whose per-sample gradients are kept as rows: only the rows of tokens
    seen in the batch (``rows``, unique, set by each backward) instead of the whole vocabulary.
    A caption touches a few dozen of 49,408 rows, so this is [pairs, U, D] instead of
    [pairs, 49408, D]; ``RowSparseDPOptimizer`` scatters the clipped sum back to full size."""

    rows: torch.Tensor | None = None


@register_grad_sampler(RowEmbedding)
def _row_embedding_grad_sample(layer: RowEmbedding, activations, backprops: torch.Tensor) -> dict:
    ids = activations[0]
    rows, inverse = torch.unique(ids, return_inverse=True)
    layer.rows = rows
    grad = backprops.new_zeros(ids.shape[0], rows.numel(), layer.embedding_dim)
    grad.scatter_add_(
        1,
        inverse.reshape(ids.shape[0], -1, 1).expand(-1, -1, layer.embedding_dim),
        backprops.reshape(ids.shape[0], -1, layer.embedding_dim),
    )
    return {layer.weight: grad}


@register_grad_sampler(ClassToken)
def _class_token_grad_sample(layer: ClassToken, activations, backprops: torch.Tensor) -> dict:
    return {layer.weight: backprops[:, 0]}


@register_grad_sampler(PositionEmbedding)
def _position_grad_sample(layer: PositionEmbedding, activations, backprops: torch.Tensor) -> dict:
    grad = backprops.new_zeros(backprops.shape[0], *layer.weight.shape)
    grad[:, : backprops.shape[1]] = backprops
    return {layer.weight: grad}


@register_grad_sampler(MatrixProjection)
def _projection_grad_sample(layer: MatrixProjection, activations, backprops: torch.Tensor) -> dict:
    return {layer.weight: torch.einsum("bi,bj->bij", activations[0], backprops)}


# open_clip subclasses LayerNorm (a dtype cast) and Linear (quantisation marker); Opacus looks its
# samplers up by exact type, so the subclasses get the parent's sampler (same parameters, same math).
register_grad_sampler(OpenClipLayerNorm)(compute_layer_norm_grad_sample)
register_grad_sampler(nn.modules.linear.NonDynamicallyQuantizableLinear)(compute_linear_grad_sample)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` has no twin (None when it has one)."""
    if not isinstance(model, open_clip.CLIP):
        return f"{type(model).__name__} is not open_clip's CLIP (custom text towers are not supported)"
    visual = model.visual
    if not isinstance(visual, VisionTransformer):
        return f"the image tower is {type(visual).__name__}, not a VisionTransformer"
    if visual.attn_pool is not None or visual.final_ln_after_pool or visual.pool_type not in ("tok", "avg"):
        return "the image tower pools with attention or after its final norm"
    if not isinstance(visual.patch_dropout, nn.Identity) or getattr(model, "logit_bias", None) is not None:
        return "patch dropout or a logit bias (SigLIP) is used"
    if isinstance(model.text_projection, nn.Linear) or model.text_pool_type != "argmax":
        return "the text tower projects with a Linear layer or pools other than at end-of-text"
    if visual.proj is None or model.text_projection is None:
        return "a tower has no projection"
    if visual.transformer.grad_checkpointing or model.transformer.grad_checkpointing:
        return "gradient checkpointing is on (the hooks would see each block twice)"
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return "parameters are not float32"
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) and (
            not module._qkv_same_embed_dim or module.bias_k is not None or not module.batch_first
        ):
            return "an attention layer has separate q/k/v weights, key/value biases or is not batch-first"
        if hasattr(module, "ls_1") and not isinstance(module.ls_1, nn.Identity):
            return "layer scale is used"
    return None


class GradSampleTwin(nn.Module):
    """``forward(images, tokens) -> (image_features, text_features)``, normalised, as the model's.

    ``attention_views`` maps each view parameter (q/k/v weights and biases) to the model's fused
    parameter name and the row range it covers, so per-sample gradients can be put back together.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"grad-sample twin: {reason}")
        shared = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
        twin = copy.deepcopy(model, memo=shared)  # new modules, the same parameter objects
        self.attention_views: dict[nn.Parameter, tuple[str, int, int]] = {}
        names = {id(p): n for n, p in model.named_parameters()}
        for parent in list(twin.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.MultiheadAttention):
                    setattr(parent, child_name, self._dp_attention(child, names))
        visual = twin.visual
        self.conv1, self.ln_pre, self.visual_transformer, self.ln_post = (
            visual.conv1,
            visual.ln_pre,
            visual.transformer,
            visual.ln_post,
        )
        self.class_token = ClassToken(visual.class_embedding)
        self.visual_position = PositionEmbedding(visual.positional_embedding)
        self.visual_proj = MatrixProjection(visual.proj)
        self.visual_pool = visual.pool_type
        self.token_embedding = self._row_embedding(twin.token_embedding)
        self.text_transformer, self.ln_final = twin.transformer, twin.ln_final
        self.text_position = PositionEmbedding(twin.positional_embedding)
        self.text_proj = MatrixProjection(twin.text_projection)
        self.register_buffer("attn_mask", twin.attn_mask, persistent=False)
        mask = twin.attn_mask
        self.causal = (
            mask is not None and mask.dim() == 2 and torch.equal(mask, torch.full_like(mask, float("-inf")).triu(1))
        )

    @staticmethod
    def _row_embedding(embedding: nn.Embedding) -> RowEmbedding:
        if embedding.padding_idx is not None or embedding.max_norm is not None:
            raise ValueError("grad-sample twin: the token embedding has a padding index or a max norm")
        rows = RowEmbedding(embedding.num_embeddings, embedding.embedding_dim, device=embedding.weight.device)
        rows.weight = embedding.weight  # the model's parameter
        return rows

    def _dp_attention(self, mha: nn.MultiheadAttention, names: dict[int, str]) -> SplitAttention:
        d = mha.embed_dim
        dp = attention_like(mha)
        for i, linear in enumerate((dp.qlinear, dp.klinear, dp.vlinear)):
            for kind in ("weight", "bias"):
                fused = getattr(mha, f"in_proj_{kind}")
                if fused is None:
                    continue
                # a view of the model's rows: same storage, so the model's updates are seen here
                view = nn.Parameter(fused.data[i * d : (i + 1) * d], requires_grad=fused.requires_grad)
                setattr(linear, kind, view)
                self.attention_views[view] = (names[id(fused)], i * d, (i + 1) * d)
        dp.out_proj.weight = mha.out_proj.weight  # the model's parameters themselves
        if mha.out_proj.bias is not None:
            dp.out_proj.bias = mha.out_proj.bias
        return dp

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = self.ln_pre(self.visual_position(self.class_token(x)))
        x = self.ln_post(self.visual_transformer(x))
        pooled = x[:, 0] if self.visual_pool == "tok" else x[:, 1:].mean(dim=1)
        return self.visual_proj(pooled)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """The model's text features, computed on the live token positions only.

        In a causal text tower (the mask checked at construction to be open_clip's causal mask),
        position p attends to positions <= p, layer norms and MLPs act per position, and the
        features are pooled at each caption's end of text (``argmax``). So the positions after the
        batch's last end of text feed nothing that is pooled: dropping them before the forward
        gives the same features and the same gradients (every parameter's gradient from those
        positions is exactly zero), at the cost of the live positions only, forward and backward.
        Without a causal mask every position is kept."""
        pool = tokens.argmax(dim=-1)
        end = int(pool.max()) + 1 if self.causal and tokens.shape[0] else tokens.shape[1]
        mask = self.attn_mask if end == tokens.shape[1] else self.attn_mask[:end, :end]
        x = self.text_position(self.token_embedding(tokens[:, :end]))
        x = self.ln_final(self.text_transformer(x, attn_mask=mask))
        return self.text_proj(x[torch.arange(x.shape[0], device=x.device), pool])

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.encode_image(images), dim=-1), F.normalize(self.encode_text(tokens), dim=-1)
