"""Released statistics: their events, their noise, and the one-block sensitivity of the loss."""

import pytest
import torch

from fedclip.data.schema import Split
from fedclip.data.tensors import load_pairs
from fedclip.models.factory import ModelConfig, create_model
from fedclip.privacy.randomness import os_seed, site_randomness
from fedclip.privacy.release import ReleaseConfig, clipped_block_losses, noisy_count, release_events
from fedclip.training.loss import clip_loss


@pytest.fixture(scope="module")
def model_and_data(small_manifest, warm_checkpoint):
    bundle = create_model(ModelConfig(pretrained=str(warm_checkpoint)))
    return bundle.model, load_pairs(
        small_manifest.rows(Split.TRAIN), preprocess=bundle.preprocess, tokenizer=bundle.tokenizer
    )


def test_nothing_is_released_by_default():
    assert release_events(ReleaseConfig(), privacy_unit="identity") == ()
    loss, count = release_events(ReleaseConfig(loss_noise=2.0, count_noise=5.0), privacy_unit="identity")
    assert loss.noise_multiplier == 2.0 and count.noise_multiplier == 5.0
    assert loss.sample_rate == 1.0 and loss.steps == 1 and loss.sensitivity == 1.0


def test_removing_a_patient_changes_one_block_by_at_most_the_bound(model_and_data):
    model, data = model_and_data
    kwargs = dict(loss_fn=clip_loss, privacy_unit="identity", num_blocks=5, key="k", bound=2.0)
    full = clipped_block_losses(model, data, **kwargs)
    victim = data.patient_ids[0]
    rest = data.subset([i for i, p in enumerate(data.patient_ids) if p != victim])
    without = clipped_block_losses(model, rest, **kwargs)
    changed = (full - without).abs()
    assert int((changed > 0).sum()) <= 1 and float(changed.max()) <= 2.0
    assert ((full >= 0) & (full <= 2.0)).all()


def test_count_noise_has_the_configured_std(model_and_data):
    _, data = model_and_data
    gen = torch.Generator().manual_seed(os_seed())
    config = ReleaseConfig(count_noise=3.0)
    draws = torch.tensor(
        [noisy_count(data, config=config, privacy_unit="identity", generator=gen) for _ in range(4000)]
    )
    assert float(draws.mean()) == pytest.approx(len(set(data.patient_ids)), abs=0.3)
    assert float(draws.std()) == pytest.approx(3.0, rel=0.06)


def test_os_randomness_differs_and_reproducible_randomness_repeats():
    a, b = (site_randomness(device=torch.device("cpu")) for _ in range(2))
    assert a.secret and not torch.equal(torch.rand(8, generator=a.noise), torch.rand(8, generator=b.noise))
    c, d = (site_randomness(device=torch.device("cpu"), reproducible_seed=4) for _ in range(2))
    assert not c.secret and torch.equal(torch.rand(8, generator=c.noise), torch.rand(8, generator=d.noise))
