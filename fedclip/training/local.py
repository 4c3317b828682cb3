"""A site's local training under per-batch DP, top to bottom.

One step: Poisson-sample micro-batches or units (Opacus' sampler); compute every sampled
group's contrastive-loss gradient at once (one backward with Opacus' hooks, ``group_grads``, or
the vmap reference; in ``unit`` mode against a bank of public negatives built when the round
starts); hand them to Opacus' ``DPOptimizer`` as
``p.grad_sample``, which clips each to norm C, sums, adds N(0, (sigma C)^2) and divides by a
public number (``DpConfig.expected_terms``); step. The non-private mode samples the same way and
takes a plain step on the whole batch. The run returns one privacy event.

Sampling and noise draw from OS entropy (``fedclip.privacy.randomness``) unless the caller asks
for a reproducible seed, which is not private against whoever knows it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from fedclip.data.tensors import PairData
from fedclip.privacy.events import DpEvent
from fedclip.privacy.microbatches import group_records, unit_ids
from fedclip.privacy.randomness import site_randomness
from fedclip.privacy.sabotage import noise_divisor
from fedclip.progress import progress_bar
from fedclip.training.allocator import retain_freed_memory
from fedclip.training.config import DpConfig, Mode, TrainConfig
from fedclip.training.extra_units import ExtraUnits
from fedclip.training.ghost_clipping import GhostDPOptimizer, GhostGroups, with_extra_rows
from fedclip.training.group_grads import dense_grads, make_grad_engine
from fedclip.training.loss import clip_loss
from fedclip.training.negative_bank import build_negative_bank


@dataclass(frozen=True)
class LocalResult:
    event: DpEvent
    losses: tuple[float, ...]
    microbatches_per_step: tuple[int, ...]
    pairs_per_step: tuple[int, ...]


def sampling_units(data: PairData, dp: DpConfig) -> list[np.ndarray]:
    """What the Poisson sampler draws from: fixed hashed micro-batches (``microbatch`` of size > 1)
    or the units themselves (every other mode); each entry lists record indices."""
    units = unit_ids(privacy_unit=dp.privacy_unit, patient_ids=data.patient_ids, record_ids=data.record_ids)
    if dp.mode == Mode.MICROBATCH and not dp.per_unit:
        # more micro-batches than units is allowed: an empty micro-batch contributes a zero
        # gradient, and refusing would itself reveal the unit count (it differs between neighbours)
        return group_records(units, num_blocks=dp.num_blocks, key=dp.hash_key)
    order = {u: i for i, u in enumerate(dict.fromkeys(units))}
    per_unit: list[list[int]] = [[] for _ in order]
    for record, u in enumerate(units):
        per_unit[order[u]].append(record)
    return [np.asarray(r) for r in per_unit]


def training_event(dp: DpConfig, train: TrainConfig) -> DpEvent:
    """The event ``train_local`` returns for these settings: fixed before any data is touched,
    so the server can plan (and charge) it before sending the round."""
    return DpEvent(
        noise_multiplier=0.0 if dp.mode == Mode.NONPRIVATE else dp.noise_multiplier,
        sample_rate=dp.sample_rate,
        steps=train.steps,
        privacy_unit=dp.privacy_unit,
        relation=dp.relation,
        sensitivity=dp.sensitivity,
    )


def make_optimizer(
    model: torch.nn.Module,
    dp: DpConfig,
    train: TrainConfig,
    *,
    expected_microbatches: float,
    noise_generator: torch.Generator | None,
) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if train.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=train.lr, momentum=0.9, nesterov=True, weight_decay=train.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
    if dp.mode == Mode.NONPRIVATE:
        return optimizer
    return GhostDPOptimizer(
        optimizer,
        noise_multiplier=dp.noise_multiplier / noise_divisor(),
        max_grad_norm=dp.max_grad_norm,
        expected_batch_size=expected_microbatches,
        loss_reduction="mean",
        generator=noise_generator,
        secure_mode=True,
    )


def train_local(
    model: torch.nn.Module,
    data: PairData,
    *,
    dp: DpConfig,
    train: TrainConfig,
    reproducible_seed: int | None = None,
    public: PairData | None = None,
    step_hook: Callable[[DPOptimizer], None] | None = None,
    canaries: ExtraUnits | None = None,
    progress: str | None = None,
) -> LocalResult:
    """Run ``train.steps`` DP steps on ``data``, updating ``model`` in place; return the privacy
    event the steps cost and per-step figures. Sampling and noise come from OS entropy.

    Parameters
    ----------
    model : torch.nn.Module
        An open_clip CLIP whose trainable parameters (``requires_grad``) are trained.
    data : PairData
        The site's training pairs, with patient and record ids (the privacy units).
    dp : DpConfig
        Mode, unit, noise multiplier, clipping norm, sampling rate, micro-batch size, the public
        divisor: what the returned event accounts for.
    train : TrainConfig
        Steps, learning rate, optimizer, gradient engine.
    reproducible_seed : int, optional
        Replaces OS entropy with a seed, for experiments only: not private against anyone who
        knows the seed.
    public : PairData, optional
        Public pairs (never a site's rows) for the negative bank of ``unit`` mode.
    step_hook : Callable[[DPOptimizer], None], optional
        Opacus' observer: called after clipping, noise and scaling, before the update, with
        ``p.grad_sample`` (raw), ``p.summed_grad`` (clipped sum) and ``p.grad`` set.
    canaries : ExtraUnits, optional
        Units an auditor inserts (``fedclip.training.extra_units``, e.g. the gradient canaries of
        ``fedclip.attacks.gradient_canaries``): each one more unit, sampled at the same rate.
    progress : str, optional
        A progress bar's label, shown where someone watches (``fedclip.progress``).
    """
    retain_freed_memory()  # once per process: the step's buffers are reused, not faulted in again
    pools = sampling_units(data, dp)
    device = next(model.parameters()).device
    randomness = site_randomness(device=device, reproducible_seed=reproducible_seed)
    sampler = UniformWithReplacementSampler(
        num_samples=len(pools), sample_rate=dp.sample_rate, generator=randomness.sampler, steps=train.steps
    )
    optimizer = make_optimizer(
        model, dp, train, expected_microbatches=dp.expected_terms, noise_generator=randomness.noise
    )
    bank = None
    if dp.mode == Mode.UNIT:
        if public is None:
            raise ValueError("public: unit mode needs public pairs for its negative bank")
        bank = build_negative_bank(model, public, size=train.negative_bank_size, generator=randomness.sampler)
    grads_of = (
        None
        if dp.mode == Mode.NONPRIVATE
        else make_grad_engine(
            model,
            train.grad_engine,
            chunk_size=train.microbatch_chunk,
            group_gradients_needed=step_hook is not None,  # canaries join ghost groups as extra rows
        )
    )
    if step_hook is not None and isinstance(optimizer, DPOptimizer):
        optimizer.attach_step_hook(step_hook)
    model.train()
    losses, counts, pairs = [], [], []
    bar = progress_bar(total=train.steps, desc=progress or "local steps")
    try:
        for picked in sampler:
            groups = _step_groups([pools[i] for i in picked], dp.mode)
            # a plain step has no clipping: its canary rows are scaled as the noisy sum is divided
            norm = dp.max_grad_norm / dp.expected_terms if dp.mode == Mode.NONPRIVATE else dp.max_grad_norm
            extra = (
                canaries.sampled_rows(model, rate=dp.sample_rate, norm=norm, generator=randomness.sampler)
                if canaries is not None
                else None
            )
            if dp.mode == Mode.NONPRIVATE:
                loss = _plain_step(model, optimizer, groups, data, device, canaries=extra)
            else:
                loss = dp_step(model, optimizer, grads_of(groups, data.images, data.tokens, bank=bank), canaries=extra)
            losses.append(loss)
            counts.append(len(groups))
            pairs.append(int(sum(len(g) for g in groups)))
            bar.update(1)
    finally:  # also when a step fails: the bar ends, and Opacus' hooks let go of the model
        bar.close()
        if hasattr(grads_of, "close"):
            grads_of.close()
    return LocalResult(
        event=training_event(dp, train),
        losses=tuple(losses),
        microbatches_per_step=tuple(counts),
        pairs_per_step=tuple(pairs),
    )


def dp_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    computed: tuple,
    *,
    canaries: dict[str, torch.Tensor] | None,
) -> float:
    """Hand every group's gradient to Opacus as ``p.grad_sample`` (the token embedding's as rows,
    ``p.grad_sample_rows``), plus the sampled canaries' rows (one per canary, norm C: clipping
    leaves them whole), and let it clip, sum, noise and step."""
    dp_hand_over(model, optimizer, computed, canaries=canaries)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(computed[1].mean()) if len(computed[1]) else float("nan")


def dp_hand_over(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    computed: tuple,
    *,
    canaries: dict[str, torch.Tensor] | None = None,
) -> None:
    """Give the optimizer the step's groups: ghost norms, or per-group gradients (and canaries)."""
    grads, group_losses, rows = computed
    if isinstance(grads, GhostGroups):  # norms and a clipped sum: no per-group rows to hand over
        optimizer.ghost_groups = grads if canaries is None else with_extra_rows(grads, model=model, rows=canaries)
    else:
        if canaries is not None:  # a canary may touch any row: full-size gradients
            grads, rows = dense_grads(model, grads, rows), {}
            grads = {name: torch.cat([g, canaries[name].to(g.dtype)]) for name, g in grads.items()}
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.grad_sample, p.grad_sample_rows = grads[name], rows.get(name)


def _step_groups(chosen: list[np.ndarray], mode: Mode) -> list[np.ndarray]:
    """What one step trains on: each sampled micro-batch or unit (``microbatch``, ``unit``); the
    whole sample as one micro-batch, present even when empty, since its noise is always added
    (``paper``); the whole sample, or nothing (``nonprivate``)."""
    if mode in (Mode.MICROBATCH, Mode.UNIT):
        return chosen
    batch = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    return [batch] if mode == Mode.PAPER or len(batch) else []


def _plain_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    groups: list[np.ndarray],
    data: PairData,
    device: torch.device,
    *,
    canaries: dict[str, torch.Tensor] | None = None,
) -> float:
    if not groups or len(groups[0]) < 2:
        return float("nan")  # nothing (or no negative) sampled: no step, as DP-SGD would only add noise
    idx = torch.as_tensor(groups[0])
    image_f, text_f, scale = model(data.images[idx].to(device), data.tokens[idx].to(device))
    loss = clip_loss(image_f, text_f, scale)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if canaries is not None:  # the sampled gradient canaries, scaled as the DP path's mean scales a unit
        for name, p in model.named_parameters():
            if name in canaries and p.grad is not None:
                p.grad += canaries[name].sum(dim=0)
    optimizer.step()
    return loss.item()
