import numpy as np
import pytest
import torch

from fedclip.data.schema import Split
from fedclip.data.tensors import load_pairs
from fedclip.distributed.grid import Grid
from fedclip.models.factory import ModelConfig, create_model
from fedclip.privacy.microbatches import unit_ids
from fedclip.training.config import DpConfig, Mode, TrainConfig
from fedclip.training.distributed import add_gradient, clipped_sum, contribution, trainable, trainable_dim
from fedclip.training.loss import clip_loss

C = 0.05


@pytest.fixture(scope="module")
def model_and_data(small_manifest, warm_checkpoint):
    bundle = create_model(ModelConfig(pretrained=str(warm_checkpoint), trainable="last-1"))
    data = load_pairs(small_manifest.rows(Split.TRAIN), preprocess=bundle.preprocess, tokenizer=bundle.tokenizer)
    return bundle.model, data


def dp(rate: float = 1.0) -> DpConfig:
    return DpConfig(mode=Mode.DISTRIBUTED, noise_multiplier=1.0, max_grad_norm=C, sample_rate=rate, declared_units=24)


def by_hand(model, data) -> torch.Tensor:
    """Each patient's pairs contrasted with each other, the gradient clipped to C, summed: plain autograd."""
    units = np.asarray(unit_ids(privacy_unit="identity", patient_ids=data.patient_ids, record_ids=data.record_ids))
    total = torch.zeros(trainable_dim(model), dtype=torch.float64)
    for u in dict.fromkeys(units.tolist()):
        idx = torch.as_tensor(np.flatnonzero(units == u))
        model.zero_grad(set_to_none=True)
        clip_loss(*model(data.images[idx], data.tokens[idx])).backward()
        g = torch.cat([p.grad.reshape(-1).double() for _, p in trainable(model)])
        total += g * min(1.0, C / (float(g.norm()) + 1e-6))
    model.zero_grad(set_to_none=True)
    return total


def test_the_clipped_sum_is_every_units_clipped_gradient_summed(model_and_data):
    model, data = model_and_data
    got = clipped_sum(model, data, dp=dp(1.0), train=TrainConfig(steps=1), sampler=torch.Generator().manual_seed(0))
    want = by_hand(model, data)
    assert float(want.norm()) > C  # several units, each at most C
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-6)


def test_a_contribution_decodes_to_the_clipped_sum_within_rounding_and_its_noise(model_and_data):
    model, data = model_and_data
    dim = trainable_dim(model)
    grid = Grid.for_clip(clip=C, dim=dim, bits=40)
    got = contribution(
        model, data, dp=dp(1.0), train=TrainConfig(steps=1), grid=grid, share_variance=4.0, reproducible_seed=3
    )
    assert got.dtype == torch.int64 and int(got.min()) >= 0 and int(got.max()) < 2**40
    decoded = grid.to_float(grid.centre(got))
    err = (decoded - by_hand(model, data)).abs().max() * grid.scale
    assert err <= 1 + 12 * 2  # one rounding step plus at most six standard deviations of Sk(4), a few times over


def test_the_server_sets_the_gradient_in_the_same_order(model_and_data):
    model, _ = model_and_data
    v = torch.arange(trainable_dim(model), dtype=torch.float64)
    add_gradient(model, v)
    assert torch.equal(torch.cat([p.grad.reshape(-1).double() for _, p in trainable(model)]), v)
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="gradient"):
        add_gradient(model, v[:-1])


def test_the_mode_is_add_or_remove_per_unit_and_refuses_micro_batches_of_several():
    assert dp().per_unit and str(dp().relation) == "add_or_remove" and dp().sensitivity == 1.0
    with pytest.raises(ValueError, match="microbatch_size"):
        DpConfig(mode=Mode.DISTRIBUTED, microbatch_size=2, declared_units=10)
