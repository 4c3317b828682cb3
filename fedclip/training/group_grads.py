"""Every micro-batch's (or unit's) gradient from one forward and one backward pass.

Why this is exact. The encoders treat each pair on its own (no batch norm, no cross-sample
attention), and the loss of group k, ``L_k``, depends only on the features of group k's pairs
(and on constants: ``logit_scale``, a public negative bank). So for the summed loss
``L = sum_k L_k``, the gradient reaching pair i's features is ``dL_k/df_i`` for the group k
holding i, and the gradient of ``L_k`` is the sum over i in k of pair i's per-sample
contribution. Opacus' grad-sample hooks give those contributions (on the twin of
``grad_sample_twin``); summing them per group gives each ``grad L_k``. ``logit_scale`` enters
every group's loss directly, so each group gets its own copy of it and its gradient is read off
that copy. The result has the layout the vmap reference (``microbatch_grads``) returns and Opacus'
``DPOptimizer`` clips: one row per group.

Cost: one forward and one backward over the step's pairs, plus per-sample gradients of the
trainable parameters ([pairs, *shape] each, summed to [groups, *shape]); vmap instead runs the
model once per group (padded) and cannot batch CPU flash attention.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from opacus.grad_sample import GradSampleModule
from torch.func import vmap

from fedclip.models.trainable import PROJECTIONS
from fedclip.training.ghost_clipping import GhostClipping
from fedclip.training.ghost_clipping import unsupported as ghost_unsupported
from fedclip.training.grad_sample_twin import GradSampleTwin, unsupported_reason
from fedclip.training.loss import group_loss
from fedclip.training.microbatch_grads import per_microbatch_grads, stacked_groups
from fedclip.training.negative_bank import NegativeBank


class GroupGradients:
    """``__call__(groups, images, tokens, bank=None) -> (grads, losses [K], rows)``: ``grads[name]``
    is [K, *shape], except the token embedding's, [K, U, width] for the U rows in ``rows[name]``
    (the only rows any group's gradient touches; see ``RowSparseDPOptimizer``).

    Built once per local training run: the twin shares the model's parameters, so steps taken on
    the model are seen without copying. Which parameters are trainable is fixed at construction.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise ValueError("trainable: the model has no trainable parameters")
        self.twin = GradSampleTwin(model)
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.hooked = GradSampleModule(self.twin, batch_first=True, loss_reduction="sum", strict=True)
        self.fused: dict[str, list[tuple[torch.nn.Parameter, int, int]]] = {}
        for view, (name, lo, hi) in self.twin.attention_views.items():
            if view.requires_grad:
                self.fused.setdefault(name, []).append((view, lo, hi))

    def __call__(
        self,
        groups: Sequence[np.ndarray | Sequence[int]],
        images: torch.Tensor,
        tokens: torch.Tensor,
        *,
        bank: NegativeBank | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        device = next(iter(self.trainable.values())).device
        k, sizes = len(groups), [len(g) for g in groups]
        if sum(sizes) == 0:  # no group, or only empty ones: zero gradients (the noise is added anyway)
            return (
                {n: torch.zeros((k, *p.shape), dtype=p.dtype, device=device) for n, p in self.trainable.items()},
                torch.zeros(k),
                {},
            )
        records, position, valid, owner = stacked_groups(groups, device)

        self._clear()
        image_f, text_f = self.hooked(images[records].to(device), tokens[records].to(device))
        log_scale = (
            self.model.logit_scale.detach().expand(k).clone().requires_grad_(self.model.logit_scale.requires_grad)
        )
        losses = vmap(functools.partial(group_loss, bank=bank))(
            image_f[position], text_f[position], log_scale.exp(), valid
        )
        with warnings.catch_warnings():  # the first hooked layers' inputs (pixels, token ids) need no gradient
            warnings.filterwarnings(
                "ignore",
                message="Full backward hook is firing when gradients are computed with "
                "respect to module outputs since no inputs require gradients",
            )
            losses.sum().backward()

        grads = {}
        for name, param in self.trainable.items():
            if name == "logit_scale":  # its own copy per group: already one row per group
                grads[name] = log_scale.grad.reshape(k, *param.shape)
            elif max(sizes) == 1 and min(sizes) == 1:  # one pair per group, in order
                grads[name] = self._per_sample(name, param)
            else:
                per_sample = self._per_sample(name, param)
                grads[name] = per_sample.new_zeros(k, *per_sample.shape[1:]).index_add_(0, owner, per_sample)
        rows = {}
        embedding = self.twin.token_embedding
        if embedding.weight.requires_grad:
            rows[self.names[id(embedding.weight)]] = embedding.rows
        self._clear()
        return grads, losses.detach(), rows

    def _per_sample(self, name: str, param: torch.nn.Parameter) -> torch.Tensor:
        if name in self.fused:  # q, k and v rows of a fused in_proj, put back in order
            out = param.new_zeros(self.fused[name][0][0].grad_sample.shape[0], *param.shape)
            for view, lo, hi in self.fused[name]:
                out[:, lo:hi] = view.grad_sample
            return out
        if getattr(param, "grad_sample", None) is None:
            raise RuntimeError(f"{name}: no per-sample gradient was computed (the twin does not use it)")
        return param.grad_sample

    def close(self) -> None:
        """Remove Opacus' hooks (they hold the twin's modules); call when the run ends."""
        self.hooked.remove_hooks()
        self._clear()

    def _clear(self) -> None:
        for p in list(self.twin.parameters()) + list(self.trainable.values()):
            p.grad_sample = None
            p.grad = None


GradEngine = Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]]


# ``auto``'s rule, from ``python -m benchmarks.dp_step`` (BENCHMARKS.md, 2-core CPU, fedclip-tiny,
# 128 pairs, and ViT-B-32): one group needs no engine (its gradient is a plain backward of its
# loss). From two groups on, ghost norms (``ghost_clipping``) were fastest for every trainable set
# and K, since they write no per-sample or per-group gradient of the large layers; they are used
# unless an auditor needs the per-group gradients themselves (canaries, a step hook). Then the
# earlier measurements decide: per-sample hooks cost about the same at any K, vmap grows with K;
# hooks won with only the projections trainable (every K) and with the token embedding trainable
# from K = 16 (vmap writes a dense [K, 49408, D] gradient: 692 vs 173 ms at K = 128); vmap won for
# last-1 at every K up to 128 and for `all` at K <= 4.
AUTO_HOOKS_FROM_K = 8


class AutoGradEngine:
    """Per step, the engine measured faster for this trainable set and this many groups."""

    def __init__(self, model: torch.nn.Module, *, chunk_size: int | None = None, ghost_allowed: bool = True) -> None:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        self.embedding_trainable = "token_embedding.weight" in names
        self.projections_only = names <= set(PROJECTIONS)
        self.ghost_covered = ghost_allowed and ghost_unsupported(model) is None
        self.model = model
        self.hooks: GroupGradients | None = None  # built on first use (17-22 ms: a twin and Opacus' hooks)
        self.ghost: GhostClipping | None = None  # likewise
        self.vmap = _vmap_engine(model, chunk_size)

    def choose(self, k: int) -> str:
        if k == 1:
            return "single"
        if self.ghost_covered:
            return "ghost"
        if self.projections_only or (self.embedding_trainable and k >= AUTO_HOOKS_FROM_K):
            return "hooks"
        return "vmap"

    def close(self) -> None:
        for engine in (self.hooks, self.ghost):
            if engine is not None:
                engine.close()

    def __call__(self, groups, images, tokens, *, bank=None):
        choice = self.choose(len(groups))
        if choice == "single":
            return single_group_grads(self.model, groups[0], images, tokens, bank=bank)
        if choice == "vmap":
            return self.vmap(groups, images, tokens, bank=bank)
        if choice == "ghost":
            if self.ghost is None:
                self.ghost = GhostClipping(self.model)
            return self.ghost(groups, images, tokens, bank=bank)
        if self.hooks is None:
            self.hooks = GroupGradients(self.model)
        return self.hooks(groups, images, tokens, bank=bank)


def single_group_grads(
    model: torch.nn.Module,
    group: np.ndarray | Sequence[int],
    images: torch.Tensor,
    tokens: torch.Tensor,
    *,
    bank: NegativeBank | None = None,
):
    """One group (``paper`` mode, or a step that sampled one micro-batch): its gradient is the
    ordinary gradient of its loss, one plain backward, as [1, *shape] rows."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    device = next(iter(trainable.values())).device
    if len(group) == 0:
        return (
            {n: torch.zeros((1, *p.shape), dtype=p.dtype, device=device) for n, p in trainable.items()},
            torch.zeros(1),
            {},
        )
    idx = torch.as_tensor(np.asarray(group), dtype=torch.long)
    image_f, text_f, scale = model(images[idx].to(device), tokens[idx].to(device))
    loss = group_loss(image_f, text_f, scale, bank=bank)
    grads = torch.autograd.grad(loss, list(trainable.values()))
    return {n: g.unsqueeze(0) for n, g in zip(trainable, grads)}, loss.detach().reshape(1), {}


def _vmap_engine(model: torch.nn.Module, chunk_size: int | None) -> GradEngine:
    def dense(*args, **kwargs):
        return (*per_microbatch_grads(model, *args, chunk_size=chunk_size, **kwargs), {})

    return dense


def make_grad_engine(
    model: torch.nn.Module, engine: str, *, chunk_size: int | None = None, group_gradients_needed: bool = False
) -> GradEngine:
    """``engine(groups, images, tokens, bank=...) -> (grads, losses, rows)`` for
    ``TrainConfig.grad_engine`` (``rows`` empty when every gradient is dense): ``hooks``
    (refused, with the reason, for a model the twin does not cover), ``vmap``, ``ghost``
    (``GhostClipping``: ``grads`` is a ``GhostGroups``, norms and a clipped sum, no per-group
    gradient; refused for what it does not cover, and when ``group_gradients_needed``: a step
    hook; an auditor's canaries join the ghost groups instead), or ``auto`` (``AutoGradEngine``; vmap for a model the twin
    does not cover). All clip the same gradients."""
    reason = unsupported_reason(model)
    if engine in ("hooks", "ghost") and reason is not None:
        raise ValueError(f"grad-engine: '{engine}' does not support this model: {reason}; use 'vmap' or 'auto'")
    if engine == "ghost":
        if group_gradients_needed:
            raise ValueError("grad-engine: 'ghost' gives no per-group gradients, which step hooks need; use 'auto'")
        return GhostClipping(model)
    if engine == "vmap" or reason is not None:
        return _vmap_engine(model, chunk_size)
    if engine == "hooks":
        return GroupGradients(model)
    return AutoGradEngine(model, chunk_size=chunk_size, ghost_allowed=not group_gradients_needed)


def dense_grads(
    model: torch.nn.Module, grads: dict[str, torch.Tensor], rows: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Row gradients scattered to full size [K, *shape] (for the auditor's gradient canaries,
    which may touch any row, and for comparisons)."""
    params = dict(model.named_parameters())
    out = dict(grads)
    for name, r in rows.items():
        g = grads[name]
        out[name] = g.new_zeros(g.shape[0], *params[name].shape).index_add_(1, r.to(g.device), g)
    return out
