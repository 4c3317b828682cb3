"""A site's part in one federated DP-SGD step: its clipped sum, on the grid, with its noise share.

Top to bottom: Poisson-sample the site's units with its secret generator; compute every sampled
unit's contrastive gradient (the same engines as local training) and let Opacus clip each to C
and sum them (``clip_and_accumulate``: the optimizer's first named step, and no other); flatten
in the model's trainable-parameter order; round onto the grid (``fedclip.distributed.grid``); add
the site's Skellam share; reduce modulo the sum's width. No step is taken here: the server
decodes the secure sum of every site's contribution, divides by the public expected count and
steps (post-processing). Linearity is what makes the sum private: the sites' vectors are summed
before anything non-linear touches them.
"""

from __future__ import annotations

import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from fedclip.data.tensors import PairData
from fedclip.distributed.grid import Grid
from fedclip.distributed.skellam import skellam_noise
from fedclip.privacy.randomness import site_randomness
from fedclip.training.config import DpConfig, Mode, TrainConfig
from fedclip.training.group_grads import make_grad_engine
from fedclip.training.local import dp_hand_over, make_optimizer, sampling_units  # the local trainer's own parts


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The order every site flattens and the server unflattens: the model's own."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def trainable_dim(model: torch.nn.Module) -> int:
    return sum(p.numel() for _, p in trainable(model))


def clipped_sum(
    model: torch.nn.Module, data: PairData, *, dp: DpConfig, train: TrainConfig, sampler: torch.Generator
) -> torch.Tensor:
    """Sum over the Poisson-sampled units of each unit's gradient clipped to ``dp.max_grad_norm``:
    flat, float64, in ``trainable`` order (zeros if no unit was sampled)."""
    if dp.mode != Mode.DISTRIBUTED:
        raise ValueError(f"dp-mode: a distributed contribution needs mode 'distributed', got {dp.mode}")
    pools = sampling_units(data, dp)
    (picked,) = list(
        UniformWithReplacementSampler(num_samples=len(pools), sample_rate=dp.sample_rate, generator=sampler, steps=1)
    )
    params = trainable(model)
    if len(picked) == 0:
        return torch.zeros(sum(p.numel() for _, p in params), dtype=torch.float64)
    optimizer = make_optimizer(model, dp, train, expected_microbatches=dp.expected_terms, noise_generator=None)
    engine = make_grad_engine(model, train.grad_engine, chunk_size=train.microbatch_chunk, group_gradients_needed=False)
    model.train()
    try:
        dp_hand_over(model, optimizer, engine([pools[i] for i in picked], data.images, data.tokens, bank=None))
        optimizer.clip_and_accumulate()  # Opacus' first named step: clip each unit to C, sum
        flat = torch.cat([p.summed_grad.detach().reshape(-1).to(torch.float64).cpu() for _, p in params])
    finally:
        optimizer.zero_grad(set_to_none=True)
        for _, p in params:
            p.summed_grad = None
        if hasattr(engine, "close"):
            engine.close()
    return flat


def contribution(
    model: torch.nn.Module,
    data: PairData,
    *,
    dp: DpConfig,
    train: TrainConfig,
    grid: Grid,
    share_variance: float,
    reproducible_seed: int | None = None,
) -> torch.Tensor:
    """What the site hands to the secure sum: round(scale * clipped sum) + Sk(share), modulo
    2**bits, int64. Sampling, rounding and noise draw from OS entropy unless a reproducible seed
    is given (not private against whoever knows it)."""
    randomness = site_randomness(device=torch.device("cpu"), reproducible_seed=reproducible_seed)
    total = clipped_sum(model, data, dp=dp, train=train, sampler=randomness.sampler)
    if total.numel() != grid.dim:
        raise ValueError(f"secure sum: the plan's grid has {grid.dim} coordinates, this model trains {total.numel()}")
    noisy = grid.round(total, generator=randomness.noise) + skellam_noise(
        (grid.dim,), variance=share_variance, generator=randomness.noise
    )
    return grid.wrap(noisy)


def flat_trainable(model: torch.nn.Module) -> torch.Tensor:
    """The trainable parameters as one flat float64 vector, in ``trainable`` order."""
    return torch.cat([p.detach().reshape(-1).to(torch.float64).cpu() for _, p in trainable(model)])


def update_contribution(
    before: torch.Tensor,
    model: torch.nn.Module,
    *,
    clip: float,
    grid: Grid,
    share_variance: float,
    reproducible_seed: int | None = None,
) -> torch.Tensor:
    """Site-level distributed DP: the site's whole update (trained minus ``before``) clipped to
    ``clip``, on the grid, with its Skellam share, modulo 2**bits (a site's update is one term of
    the sum, so one site moves it by at most ``clip``)."""
    update = flat_trainable(model) - before
    update = update * min(1.0, clip / (float(update.norm()) + 1e-12))
    if update.numel() != grid.dim:
        raise ValueError(f"secure sum: the plan's grid has {grid.dim} coordinates, this model trains {update.numel()}")
    noise = site_randomness(device=torch.device("cpu"), reproducible_seed=reproducible_seed).noise
    return grid.wrap(
        grid.round(update, generator=noise) + skellam_noise((grid.dim,), variance=share_variance, generator=noise)
    )


def add_gradient(model: torch.nn.Module, vector: torch.Tensor) -> None:
    """Set each trainable parameter's ``.grad`` from a flat vector in ``trainable`` order (the server's step)."""
    params = trainable(model)
    if vector.numel() != sum(p.numel() for _, p in params):
        raise ValueError(f"gradient: expected {sum(p.numel() for _, p in params)} coordinates, got {vector.numel()}")
    offset = 0
    for _, p in params:
        n = p.numel()
        p.grad = vector[offset : offset + n].reshape(p.shape).to(dtype=p.dtype, device=p.device).clone()
        offset += n
