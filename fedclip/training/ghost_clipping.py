"""Every group's gradient norm, and the clipped sum, without writing a per-sample or per-group
gradient of the large layers ("ghost" norms, extended from one sample to a group of samples).

For a ``Linear`` layer, group k's weight gradient is ``W_k = G_k^T A_k``, where ``A_k`` stacks the
layer's inputs at every token of the group's pairs and ``G_k`` the loss gradients at its outputs
([m_k T, i] and [m_k T, j]). Its squared norm needs only two Gram matrices over those tokens:

    ||W_k||_F^2 = sum_{s,t} (A_k A_k^T)_{st} (G_k G_k^T)_{st}

(Li et al. 2022, "ghost clipping", for one sample; over a group the Gram matrices simply span all
its tokens). In float32 the Gram sum can lose precision when its terms cancel, so a bound on its
rounding error is added (``_gram_rounding``): the norm clipped with is never below the true one.
That bound assumes IEEE float32 (or float64) matmuls: under TF32 (Ampere GPUs, ``allow_tf32``) or
``torch.set_float32_matmul_precision("high" | "medium")`` a matmul rounds to 10 or 7 mantissa bits
and the bound no longer holds, so a group could contribute more than C. Every ghost computation
therefore runs under ``full_precision_matmuls`` (TF32 off, precision "highest", restored after;
a warning says so once when it had to change a setting), and parameters that are not float32
are refused (``unsupported``).
With clip factors ``c_k = min(1, C / (||g_k|| + 1e-6))``, Opacus' formula applied by the
optimizer, the clipped sum ``sum_k c_k W_k = (c * G)^T A`` is one matmul, the size of a plain
step's weight gradient. Per layer, the Gram route is taken when it is cheaper than writing the
group gradients, ``(m T)^2 (i + j) < m T i j``; otherwise the [K, j, i] group gradients are written
(one batched matmul, no larger than the layer's inputs and output gradients), their norms taken and
the clipped sum taken as their weighted sum. The small parameters (biases, layer norms, class and
positional embeddings, the projections, ``logit_scale``) get their [K, *shape] group gradients
written: they are small.

Flow: one forward on the parameter-sharing twin (``grad_sample_twin``; its causal text tower runs on
the live token positions only, exactly), whose trainable modules'
inputs and outputs are recorded by forward hooks; one ``torch.autograd.grad`` of the summed group
losses with respect to those outputs (and the per-group ``logit_scale`` copies), which passes
through the trainable layers once and computes no weight gradient; then ``GhostGroups`` (norms,
and the clipped sum for any clip factors). Exact for the reason ``group_grads`` gives (each group's
loss depends on its own pairs' features only); the tests compare the norms and the clipped sum
with Opacus clipping the vmap reference's group gradients. The sensitivity argument is therefore
the one of the mode: the optimizer still clips each group to C (from these norms) and adds the
noise to the sum.

Covered: ``Linear`` (also q/k/v views of a fused ``in_proj``), the patch convolution (a matmul over
unfolded patches), the token embedding (each group's distinct tokens: its norm from those rows, the
clipped sum scattered to full size before the optimizer's noise), layer norms, the class and
positional embeddings, the projections and ``logit_scale``: every open_clip CLIP the twin covers.
What is not covered is named by ``unsupported``, and the caller uses another engine. No per-group
gradients exist here, so an auditor's canaries and step hooks need another engine.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm as OpenClipLayerNorm
from open_clip.transformer import VisionTransformer
from torch import nn
from torch.func import vmap

from fedclip.training.grad_sample_twin import (
    ClassToken,
    GradSampleTwin,
    MatrixProjection,
    PositionEmbedding,
    unsupported_reason,
)
from fedclip.training.loss import group_loss
from fedclip.training.microbatch_grads import stacked_groups
from fedclip.training.negative_bank import NegativeBank
from fedclip.training.row_sparse_optimizer import RowSparseDPOptimizer

_warned_precision = False


# the matmuls of the norms and the clipped sum (the twin's convolution only makes activations,
# which the bound takes as given: it bounds the rounding of what is computed from them)
_PRECISION_SETTINGS = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)


def _effective(setting) -> str:
    """A backend's float32 precision: its own, else the global one ("none" inherits; default IEEE)."""
    value = setting.fp32_precision
    if value == "none":
        value = torch.backends.fp32_precision
    return "ieee" if value == "none" else value


@contextlib.contextmanager
def full_precision_matmuls():
    """IEEE float32 matmuls inside (TF32 / bf16 reduced precision switched off,
    through torch's ``fp32_precision`` settings), the user's settings restored after: the ghost
    norms' rounding bound assumes them."""
    global _warned_precision
    saved = [s.fp32_precision for s in _PRECISION_SETTINGS]
    reduced = sorted({_effective(s) for s in _PRECISION_SETTINGS} - {"ieee"})
    if reduced and not _warned_precision:
        _warned_precision = True
        warnings.warn(
            f"grad-engine 'ghost': TF32 / reduced-precision float32 matmuls ({', '.join(reduced)}) are "
            "switched off during DP steps; the bound on the ghost norms' rounding, which keeps the "
            "sensitivity at C, assumes IEEE float32 matmuls",
            stacklevel=3,
        )
    for setting in _PRECISION_SETTINGS:
        setting.fp32_precision = "ieee"
    try:
        yield
    finally:
        for setting, value in zip(_PRECISION_SETTINGS, saved):
            setting.fp32_precision = value


_COVERED = (
    nn.Linear,
    nn.LayerNorm,
    OpenClipLayerNorm,
    MatrixProjection,
    ClassToken,
    PositionEmbedding,
    nn.Conv2d,
    nn.Embedding,
)


# What holds trainable parameters in open_clip's CLIP and becomes a covered module in the twin:
# attention (q/k/v views and a Linear), CLIP and its image tower (the loose class and positional
# embeddings, projections and logit_scale); everything else is used as it is.
_MODEL_COVERED = (
    nn.Linear,
    nn.LayerNorm,
    nn.Conv2d,
    nn.Embedding,
    nn.MultiheadAttention,
    open_clip.CLIP,
    VisionTransformer,
)


def unsupported(model: nn.Module) -> str | None:
    """Why the ghost engine cannot serve this model and trainable set (None when it can). Read off
    the model, without building a twin (which costs as much as copying the model); the engine
    checks its twin again when it is built."""
    reason = unsupported_reason(model)
    if reason is not None:
        return reason
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            if not isinstance(module, _MODEL_COVERED) or (isinstance(module, nn.Conv2d) and module.groups != 1):
                return _not_covered(name, module)
    return None


def _not_covered(name: str, module: nn.Module) -> str:
    return (
        f"{name} ({type(module).__name__}) is trainable; ghost norms cover linear layers, ungrouped "
        "convolutions, layer norms and embeddings"
    )


@dataclass(frozen=True)
class GhostGroups:
    """One step's groups: ``norms`` [K] (each group's gradient norm over every trainable
    parameter) and ``clipped_sum(factors)`` -> {id(model parameter): sum_k factors[k] g_k}."""

    norms: torch.Tensor
    clipped_sum: Callable[[torch.Tensor], dict[int, torch.Tensor]]


def with_extra_rows(groups: GhostGroups, *, model: nn.Module, rows: dict[str, torch.Tensor]) -> GhostGroups:
    """``groups`` and n more, given as dense per-group gradient rows ({trainable parameter name:
    [n, *shape]}, an auditor's canaries): their norms join the step's norms, so the optimizer clips
    them with the same factor ``min(1, C / (norm + 1e-6))`` as every group, and their clipped sum
    joins the groups' clipped sum. The same arithmetic as handing the rows over beside per-group
    gradients, without making the step's groups dense."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(rows) != set(params):
        raise ValueError(f"extra rows: expected one per trainable parameter, got {sorted(set(rows) ^ set(params))[:3]}")
    count = len(groups.norms)
    extra_norms = torch.sqrt(sum(r.reshape(len(r), -1).double().pow(2).sum(dim=1) for r in rows.values()))

    def clipped_sum(factors: torch.Tensor) -> dict[int, torch.Tensor]:
        sums = groups.clipped_sum(factors[:count])
        extra = factors[count:]
        for name, p in params.items():
            row = rows[name].to(sums[id(p)].dtype)
            sums[id(p)] = sums[id(p)] + torch.einsum("n,n...->...", extra.to(row.dtype), row)
        return sums

    return GhostGroups(norms=torch.cat([groups.norms, extra_norms.to(groups.norms.dtype)]), clipped_sum=clipped_sum)


# One parameter's share of a step: its squared norm per group [K], and its clipped sum given the
# clip factor of every pair ([n], the factor of the pair's group) and of every group ([K]).
_Share = tuple[nn.Parameter, torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


@dataclass(frozen=True, eq=False)
class _Layout:
    """Where each pair sits: ``position`` [K, m] pair indices (padding points at 0), ``valid`` [K, m]
    and ``owner`` [n] (each pair's group)."""

    position: torch.Tensor
    valid: torch.Tensor
    owner: torch.Tensor

    @property
    def k(self) -> int:
        return self.position.shape[0]

    @functools.cached_property
    def contiguous(self) -> bool:
        """Equal groups, no padding: pairs come in group order, so grouping is a reshape."""
        return bool(self.valid.all()) and self.position.numel() == len(self.owner)

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """[n, T, d] -> [K, m T, d], padding rows zero."""
        k, m = self.position.shape
        if self.contiguous:
            return x.reshape(k, m * x.shape[1], x.shape[2])
        g = x[self.position] * self.valid[:, :, None, None].to(x.dtype)
        return g.reshape(k, m * x.shape[1], x.shape[2])

    def per_group(self, per_pair: torch.Tensor) -> torch.Tensor:
        """[n, *shape] -> [K, *shape] (sum over each group's pairs)."""
        if self.contiguous:
            return per_pair.reshape(self.k, -1, *per_pair.shape[1:]).sum(1)
        return per_pair.new_zeros(self.k, *per_pair.shape[1:]).index_add_(0, self.owner, per_pair)


def _written(param: nn.Parameter, per_group: torch.Tensor) -> _Share:
    """Group gradients written out, [K, *shape]: the norms from them, the clipped sum as their
    weighted sum (the factors of the groups; K * numel, not a matmul over every token)."""
    return (
        param,
        torch.linalg.vector_norm(per_group.reshape(per_group.shape[0], -1), dim=1).square(),  # as Opacus
        lambda pair_f, group_f: torch.einsum("k,k...->...", group_f, per_group),
    )


def _matmul_weight(
    param: nn.Parameter, a: torch.Tensor, g: torch.Tensor, layout: _Layout, *, transposed: bool
) -> _Share:
    """``y = a W^T`` (``Linear``, W [j, i]) or ``y = a W`` (``transposed``, W [i, j]); a [n, T, i], g [n, T, j]."""
    i, j = a.shape[-1], g.shape[-1]
    ag, gg = layout.grouped(a), layout.grouped(g)
    tokens = ag.shape[1]
    if tokens * (i + j) >= i * j:  # written route: [K, j, i], no larger than the layer's a and g
        per_group = gg.transpose(1, 2) @ ag
        return _written(param, (per_group.transpose(1, 2) if transposed else per_group).reshape(-1, *param.shape))
    terms = (ag @ ag.transpose(1, 2)).double() * (gg @ gg.transpose(1, 2)).double()  # Gram route: exact products
    sq = terms.sum((1, 2)).clamp_min(0) + _gram_rounding(ag, gg)

    def clipped(pair_f: torch.Tensor, group_f: torch.Tensor) -> torch.Tensor:
        scale = pair_f[:, None, None]  # on the narrower side: (c g)^T a = g^T (c a)
        ga, aa = (g * scale, a) if j <= i else (g, a * scale)
        w = ga.reshape(-1, j).T @ aa.reshape(-1, i)  # [j, i]
        return (w.T if transposed else w).reshape(param.shape)

    return param, sq, clipped


def _gram_rounding(ag: torch.Tensor, gg: torch.Tensor) -> torch.Tensor:
    """An upper bound on the float32 rounding error of the Gram route's squared norm, added to it
    so that the norm the optimizer clips with is never below the true one (sensitivity stays C).

    Why it is needed: the Gram sum adds signed terms, and when they cancel its relative error can
    be far larger than that of a written gradient; an underestimated norm would let a group
    contribute more than C. The Gram entries are float32 dot products of length i and j, each
    off by at most n u |a_s||a_t| (resp. |g_s||g_t|), u = 2^-24, the standard bound for any
    summation order; their products and the sum over the T^2 token pairs are taken in float64
    (the products exactly, the sum off by at most T^2 2^-53 of the absolute terms). Every term is
    at most |a_s||a_t||g_s||g_t|, so the error is at most
    ((i + j) 2u + T^2 2^-52) (sum_s |a_s||g_s|)^2, with 2u covering the second-order terms. It costs
    one norm per token row and makes clipping slightly stronger, never weaker. (A written
    gradient's norm has the rounding of Opacus' own per-sample path, relative n u with no
    cancellation, which neither Opacus nor this project bounds.)"""
    tokens, i, j = ag.shape[1], ag.shape[2], gg.shape[2]
    spread = (ag.norm(dim=2).double() * gg.norm(dim=2).double()).sum(1)
    return spread.pow(2) * ((i + j) * 2.0**-23 + tokens * tokens * 2.0**-52)


def _embedding_weight(param: nn.Parameter, ids: torch.Tensor, g: torch.Tensor, layout: _Layout) -> _Share:
    """A token embedding: group k's gradient has a row per distinct token of its captions (the
    sum of the output gradients where that token sits); its norm comes from those rows alone, and
    the clipped sum is scattered to full size, so the optimizer's noise covers every row."""
    vocab, width = param.shape
    ids, rows = ids.reshape(-1), g.reshape(-1, width)
    group_of = layout.owner.repeat_interleave(g.shape[1])
    keys, inverse = torch.unique(group_of * vocab + ids, return_inverse=True)
    per_key = rows.new_zeros(keys.numel(), width).index_add_(0, inverse, rows)
    sq = rows.new_zeros(layout.k).index_add_(0, keys // vocab, torch.linalg.vector_norm(per_key, dim=1).square())

    def clipped(pair_f: torch.Tensor, group_f: torch.Tensor) -> torch.Tensor:
        return rows.new_zeros(vocab, width).index_add_(0, ids, rows * pair_f.repeat_interleave(g.shape[1])[:, None])

    return param, sq, clipped


def _shares(module: nn.Module, a: torch.Tensor, g: torch.Tensor, layout: _Layout) -> list[_Share]:
    """Every trainable parameter of one recorded module application."""
    out: list[_Share] = []
    if isinstance(module, (nn.Linear, MatrixProjection)):
        a3, g3 = (a, g) if a.dim() == 3 else (a[:, None], g[:, None])
        if module.weight.requires_grad:
            out.append(_matmul_weight(module.weight, a3, g3, layout, transposed=isinstance(module, MatrixProjection)))
        bias = getattr(module, "bias", None)
        if bias is not None and bias.requires_grad:
            out.append(_written(bias, layout.per_group(g3.sum(1))))
    elif isinstance(module, nn.LayerNorm):
        dims = tuple(range(1, a.dim() - len(module.normalized_shape)))  # the token dimensions
        if module.weight is not None and module.weight.requires_grad:
            normed = F.layer_norm(a, module.normalized_shape, eps=module.eps)
            out.append(_written(module.weight, layout.per_group((g * normed).sum(dims) if dims else g * normed)))
        if module.bias is not None and module.bias.requires_grad:
            out.append(_written(module.bias, layout.per_group(g.sum(dims) if dims else g)))
    elif isinstance(module, nn.Conv2d):  # a matmul over the unfolded patches
        patches = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
        if module.weight.requires_grad:
            out.append(_matmul_weight(module.weight, patches, g.flatten(2).transpose(1, 2), layout, transposed=False))
        if module.bias is not None and module.bias.requires_grad:
            out.append(_written(module.bias, layout.per_group(g.sum((2, 3)))))
    elif isinstance(module, nn.Embedding):
        out.append(_embedding_weight(module.weight, a, g, layout))
    elif isinstance(module, ClassToken):
        out.append(_written(module.weight, layout.per_group(g[:, 0])))
    elif isinstance(module, PositionEmbedding):
        full = g.new_zeros(g.shape[0], *module.weight.shape)
        full[:, : g.shape[1]] = g
        out.append(_written(module.weight, layout.per_group(full)))
    return out


def _each_once(shares: list[_Share]) -> None:
    """Squared norms add over parameters only if each parameter's group gradient is counted once:
    a module applied twice in one forward (or a weight shared by two modules) would have two
    shares whose sum, not each, is the gradient. CLIP applies each once; refuse anything else."""
    seen: set[int] = set()
    for param, _, _ in shares:
        if id(param) in seen:
            raise RuntimeError(
                "ghost norms: a trainable parameter is used twice in one forward (a shared "
                "weight or a module applied twice); use grad-engine 'hooks' or 'vmap'"
            )
        seen.add(id(param))


class GhostClipping:
    """``__call__(groups, images, tokens, bank=None) -> (GhostGroups, losses [K], {})``.

    Built once per local training run, like ``GroupGradients``; which parameters are trainable
    is fixed at construction.
    """

    def __init__(self, model: nn.Module) -> None:
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"grad-engine: 'ghost' does not support this model: {reason}")
        self.model = model
        self.twin = GradSampleTwin(model)
        for name, module in self.twin.named_modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)) and not isinstance(module, _COVERED):
                raise ValueError(f"grad-engine: 'ghost' does not support this model: {_not_covered(name, module)}")
        names = {id(p): n for n, p in model.named_parameters()}
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        # twin parameter -> (model parameter, row range or None): q/k/v views map into a fused in_proj
        self.target: dict[int, tuple[nn.Parameter, tuple[int, int] | None]] = {}
        for p in self.twin.parameters():
            if id(p) in names:
                self.target[id(p)] = (p, None)
        every = dict(model.named_parameters())
        for view, (name, lo, hi) in self.twin.attention_views.items():
            self.target[id(view)] = (every[name], (lo, hi))
        self._records: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        self._handles = [
            m.register_forward_hook(self._record)
            for m in self.twin.modules()
            if any(p.requires_grad for p in m.parameters(recurse=False))
        ]

    def _record(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._records.append((module, inputs[0].detach(), output))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._records = [], []

    def __call__(
        self,
        groups: Sequence[np.ndarray | Sequence[int]],
        images: torch.Tensor,
        tokens: torch.Tensor,
        *,
        bank: NegativeBank | None = None,
    ) -> tuple[GhostGroups, torch.Tensor, dict]:
        device = next(iter(self.params.values())).device
        k, sizes = len(groups), [len(g) for g in groups]
        if sum(sizes) == 0:  # nothing sampled: zero norms, a zero sum (the noise is added anyway)
            zeros = {id(p): torch.zeros_like(p) for p in self.params.values()}
            return (
                GhostGroups(norms=torch.zeros(k, device=device), clipped_sum=lambda f: dict(zeros)),
                torch.zeros(k),
                {},
            )
        records, position, valid, owner = stacked_groups(groups, device)
        layout = _Layout(position=position, valid=valid, owner=owner)

        self._records = []
        with full_precision_matmuls():
            try:
                image_f, text_f = self.twin(images[records].to(device), tokens[records].to(device))
                log_scale = (
                    self.model.logit_scale.detach()
                    .expand(k)
                    .clone()
                    .requires_grad_(self.model.logit_scale.requires_grad)
                )
                losses = vmap(functools.partial(group_loss, bank=bank))(
                    image_f[layout.position], text_f[layout.position], log_scale.exp(), layout.valid
                )
                outputs = [out for _, _, out in self._records]
                wrt = outputs + ([log_scale] if log_scale.requires_grad else [])
                grads = torch.autograd.grad(losses.sum(), wrt, allow_unused=True)
                shares: list[_Share] = []
                for (module, a, out), g in zip(self._records, grads):
                    if g is not None:
                        shares += _shares(module, a, g.detach(), layout)
                if log_scale.requires_grad:
                    shares.append(_written(self.model.logit_scale, grads[-1].reshape(k, *self.model.logit_scale.shape)))
            finally:
                self._records = []
        return self._groups(shares, layout), losses.detach(), {}

    def _groups(self, shares: list[_Share], layout: _Layout) -> GhostGroups:
        _each_once(shares)
        norms = torch.stack([sq.double() for _, sq, _ in shares]).sum(0).sqrt()  # float64, never rounded down
        dtype = next(iter(self.params.values())).dtype

        def clipped_sum(factors: torch.Tensor) -> dict[int, torch.Tensor]:
            with full_precision_matmuls():
                return _clipped_sum(factors)

        def _clipped_sum(factors: torch.Tensor) -> dict[int, torch.Tensor]:
            factors = _rounded_down(factors.to(norms.device), dtype)
            pair_f = factors[layout.owner]
            out: dict[int, torch.Tensor] = {}
            for param, _, total in shares:
                target, rows = self.target.get(id(param), (param, None))
                value = total(pair_f, factors)
                if rows is not None:  # a q/k/v view: its rows of the fused parameter
                    out.setdefault(id(target), torch.zeros_like(target))[rows[0] : rows[1]] += value
                elif id(target) in out:
                    out[id(target)] = out[id(target)] + value
                else:
                    out[id(target)] = value
            for p in self.params.values():  # a parameter no group's loss reached: a zero sum (noised)
                out.setdefault(id(p), torch.zeros_like(p))
            return out

        return GhostGroups(norms=norms, clipped_sum=clipped_sum)


def _rounded_down(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` in ``dtype``, each rounded towards zero (a clip factor must not grow)."""
    cast = values.to(dtype)
    return torch.where(cast.double() > values.double(), torch.nextafter(cast, torch.zeros_like(cast)), cast)


class GhostDPOptimizer(RowSparseDPOptimizer):
    """``RowSparseDPOptimizer`` that also takes a step's groups as ``GhostGroups``
    (``ghost_groups``, set before ``step``): it computes Opacus' clip factors from their norms,
    ``min(1, C / (norm + 1e-6))`` with its own C, and takes their clipped sum; noise, scaling and
    the step are Opacus' own, as for per-group gradients."""

    ghost_groups: GhostGroups | None = None

    def clip_and_accumulate(self) -> None:
        groups = self.ghost_groups
        if groups is None:
            super().clip_and_accumulate()
            return
        if any(p.summed_grad is not None for p in self.params):
            raise ValueError("GhostDPOptimizer: ghost groups cannot be accumulated over several batches")
        factors = (self.max_grad_norm / (groups.norms + 1e-6)).clamp(max=1.0)
        sums = groups.clipped_sum(factors)
        for p in self.params:
            p.summed_grad = sums[id(p)]

    @property
    def grad_samples(self):  # Opacus only checks, before clipping, that there is something to clip
        if self.ghost_groups is not None:
            return [self.ghost_groups.norms for _ in self.params]
        return super().grad_samples

    @property
    def accumulated_iterations(self) -> int:  # one batch per step (accumulation is refused above)
        return 1 if self.ghost_groups is not None else super().accumulated_iterations

    def zero_grad(self, set_to_none: bool = False) -> None:
        super().zero_grad(set_to_none)
        self.ghost_groups = None
