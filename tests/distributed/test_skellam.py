import numpy as np
import pytest
import torch

from fedclip.distributed.skellam import skellam_noise, skellam_rdp
from tests.distributed.divergences import skellam_shift_divergence


@pytest.mark.parametrize("variance", [8.0, 50.0, 400.0])
@pytest.mark.parametrize("shift", [1, 2, 5])
@pytest.mark.parametrize("order", [2, 3, 8, 20])
def test_the_bound_holds_on_one_coordinate(variance, shift, order):
    exact = skellam_shift_divergence(shift, variance=variance, order=order)
    bound = skellam_rdp(order, l1=shift, l2=shift, variance=variance)
    assert exact <= bound * (1 + 1e-9)


@pytest.mark.parametrize("vector", [(1, 2, 0, 3), (4, 1, 1), (1,) * 9])
@pytest.mark.parametrize("order", [2, 6, 16])
def test_the_bound_holds_on_integer_vectors(vector, order):
    """Independent noise per coordinate: the divergence of the product is the sum over coordinates."""
    variance = 60.0
    exact = sum(skellam_shift_divergence(v, variance=variance, order=order) for v in vector if v)
    v = np.asarray(vector, dtype=float)
    bound = skellam_rdp(order, l1=np.abs(v).sum(), l2=np.linalg.norm(v), variance=variance)
    assert exact <= bound * (1 + 1e-9)


def test_the_bound_is_close_to_the_truth_when_the_noise_is_large():
    """Far from a loose bound: within 5% of the exact divergence, which tends to the Gaussian's."""
    for order in (2, 10):
        exact = skellam_shift_divergence(3, variance=400.0, order=order)
        assert skellam_rdp(order, l1=3, l2=3, variance=400.0) <= 1.05 * exact
        assert exact == pytest.approx(order * 9 / (2 * 400.0), rel=0.05)


def test_noise_is_integer_with_the_planned_variance_and_shares_add_up():
    gen = torch.Generator().manual_seed(1)
    one = skellam_noise((200_000,), variance=1e6, generator=gen)
    assert one.dtype == torch.int64
    assert float(one.double().var()) == pytest.approx(1e6, rel=0.02)
    shares = sum(skellam_noise((200_000,), variance=2.5e5, generator=gen) for _ in range(4))
    assert float(shares.double().var()) == pytest.approx(1e6, rel=0.02)
    assert skellam_noise((3,), variance=0.0, generator=gen).abs().sum() == 0


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="order"):
        skellam_rdp(1, l1=1, l2=1, variance=1)
    with pytest.raises(ValueError, match="order"):
        skellam_rdp(2.5, l1=1, l2=1, variance=1)
    with pytest.raises(ValueError, match="variance"):
        skellam_rdp(2, l1=1, l2=1, variance=0)
    with pytest.raises(ValueError, match="variance"):
        skellam_noise((2,), variance=-1.0, generator=torch.Generator())
