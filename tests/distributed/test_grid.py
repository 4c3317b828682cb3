import math

import pytest
import torch

from fedclip.distributed.grid import Grid
from fedclip.distributed.skellam import skellam_noise


def test_rounding_is_unbiased_and_integer():
    grid = Grid(scale=1.0, bits=20, dim=4)
    x = torch.tensor([0.25, -1.5, 2.0, 7.9])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([grid.round(x, generator=gen) for _ in range(20_000)]).double()
    assert draws.dtype == torch.float64 and torch.equal(draws, draws.round())
    assert torch.allclose(draws.mean(0), x.double(), atol=0.02)
    assert ((draws - x.double()).abs() < 1).all()


def test_the_rounded_change_stays_within_the_stated_sensitivity_for_any_shared_uniform():
    """The coupling the argument rests on: one U for both inputs, the rounded difference within
    scale * clip + sqrt(dim) in L2 and the L1 bound too, for inputs that differ by a clipped vector."""
    dim, clip = 64, 1.0
    grid = Grid(scale=3.7, bits=30, dim=dim)
    sens = grid.sensitivity(clip=clip)
    gen = torch.Generator().manual_seed(5)
    worst_l2 = worst_l1 = 0.0
    for _ in range(500):
        y = torch.randn(dim, generator=gen, dtype=torch.float64) * 10
        g = torch.randn(dim, generator=gen, dtype=torch.float64)
        g = g / g.norm() * clip * float(torch.rand(1, generator=gen))
        seed = int(torch.randint(0, 2**31, (1,), generator=gen))
        a = grid.round(y, generator=torch.Generator().manual_seed(seed))
        b = grid.round(y + g, generator=torch.Generator().manual_seed(seed))
        diff = (b - a).double()
        worst_l2, worst_l1 = max(worst_l2, float(diff.norm())), max(worst_l1, float(diff.abs().sum()))
    assert worst_l2 <= sens.l2 and worst_l1 <= sens.l1
    assert sens.l2 == pytest.approx(3.7 + 8) and sens.l1 <= sens.l2**2


def test_for_clip_makes_rounding_a_small_share_of_the_sensitivity():
    grid = Grid.for_clip(clip=2.0, dim=10_000, bits=30, rounding_share=0.01)
    assert grid.sensitivity(clip=2.0).l2 == pytest.approx(grid.scale * 2.0 * 1.01)


def test_a_modular_sum_of_wrapped_vectors_decodes_to_the_exact_sum():
    grid = Grid(scale=1.0, bits=16, dim=1000)
    gen = torch.Generator().manual_seed(2)
    parts = [
        torch.randint(-3000, 3000, (1000,), generator=gen) + skellam_noise((1000,), variance=1e4, generator=gen)
        for _ in range(5)
    ]
    wrapped = sum(grid.wrap(p) for p in parts)
    assert bool(((grid.wrap(parts[0]) >= 0) & (grid.wrap(parts[0]) < 2**16)).all())
    assert torch.equal(grid.centre(torch.remainder(wrapped, grid.modulus)), sum(parts))


def test_wrap_probability_bounds_the_observed_wraps_and_refuses_a_sum_that_cannot_fit():
    grid = Grid(scale=1.0, bits=12, dim=20_000)  # range [-2048, 2048)
    variance = 350.0**2
    gen = torch.Generator().manual_seed(3)
    trials = 50
    wrapped = sum(
        bool((skellam_noise((20_000,), variance=variance, generator=gen).abs() >= 2047).any()) for _ in range(trials)
    )
    bound = grid.wrap_probability(signal=0.0, variance=variance)
    assert wrapped / trials <= bound + 0.15  # the bound holds (with room for 50 trials' chance)
    assert grid.wrap_probability(signal=0.0, variance=100.0**2) < 1e-9
    assert grid.wrap_probability(signal=3000.0, variance=1.0) == 1.0
    assert math.isclose(grid.wrap_probability(signal=0.0, variance=0.0), 0.0)


def test_bad_grids_are_refused_by_name():
    with pytest.raises(ValueError, match="bits"):
        Grid(scale=1.0, bits=64, dim=3)
    with pytest.raises(ValueError, match="scale"):
        Grid(scale=0.0, bits=16, dim=3)
    with pytest.raises(ValueError, match="round"):
        Grid(scale=1.0, bits=16, dim=3).round(torch.zeros(4), generator=torch.Generator())
