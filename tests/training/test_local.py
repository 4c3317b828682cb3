import math

import pytest
import torch

from fedclip.data.schema import Split
from fedclip.data.tensors import load_pairs
from fedclip.evaluation.zero_shot import zero_shot_accuracy
from fedclip.models.factory import ModelConfig, create_model
from fedclip.privacy.accountant import epsilon
from fedclip.training.config import DpConfig, Mode, TrainConfig
from fedclip.training.local import sampling_units, train_local, training_event


@pytest.fixture(scope="module")
def bundle_and_data(small_manifest, warm_checkpoint):
    bundle = create_model(ModelConfig(pretrained=str(warm_checkpoint)))
    train = load_pairs(small_manifest.rows(Split.TRAIN), preprocess=bundle.preprocess, tokenizer=bundle.tokenizer)
    # utility on images never trained on: held-out patients and members' query images
    frame = small_manifest.frame[small_manifest.frame["split"].isin(["heldout", "query"])]
    test = load_pairs(frame, preprocess=bundle.preprocess, tokenizer=bundle.tokenizer)
    return bundle, train, test


@pytest.fixture(scope="module")
def public(small_manifest, bundle_and_data):
    bundle = bundle_and_data[0]
    return load_pairs(small_manifest.rows(Split.PUBLIC), preprocess=bundle.preprocess, tokenizer=bundle.tokenizer)


def _fresh(warm_checkpoint, trainable="all"):
    torch.manual_seed(0)
    return create_model(ModelConfig(pretrained=str(warm_checkpoint), trainable=trainable)).model


def test_every_microbatch_gradient_entering_the_sum_is_clipped(bundle_and_data, warm_checkpoint):
    _, train, _ = bundle_and_data
    C = 0.05  # far below the raw norms, so clipping is active
    seen = []

    def check(opt):
        norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in opt.grad_samples], dim=1).norm(dim=1)
        factors = (C / (norms + 1e-6)).clamp(max=1.0)
        assert (norms * factors <= C * (1 + 1e-5)).all()
        for p, g in zip(opt.params, opt.grad_samples):
            clipped = torch.einsum("i,i...", factors, g)
            if p.grad_sample_rows is not None:  # the token embedding's rows: zero elsewhere
                clipped = clipped.new_zeros(p.shape).index_add_(0, p.grad_sample_rows, clipped)
            torch.testing.assert_close(p.summed_grad, clipped, rtol=1e-4, atol=1e-7)
        seen.append((len(norms), float(norms.max()) if len(norms) else 0.0))

    dp = DpConfig(
        mode=Mode.MICROBATCH,
        noise_multiplier=1.0,
        max_grad_norm=C,
        sample_rate=0.6,
        microbatch_size=6,
        declared_units=24,
    )
    train_local(_fresh(warm_checkpoint), train, dp=dp, train=TrainConfig(steps=3), reproducible_seed=0, step_hook=check)
    assert len(seen) == 3 and max(n for _, n in seen) > C * 10


def test_noise_has_the_standard_deviation_the_accountant_assumes(bundle_and_data, warm_checkpoint):
    _, train, _ = bundle_and_data
    sigma, C, q, B = 2.5, 0.3, 0.5, 4
    stds = []

    def measure(opt):
        expected = opt.expected_batch_size
        noise = torch.cat([(p.grad * expected - p.summed_grad).reshape(-1) for p in opt.params])
        stds.append(float(noise.std()))

    dp = DpConfig(
        mode=Mode.MICROBATCH,
        noise_multiplier=sigma,
        max_grad_norm=C,
        sample_rate=q,
        microbatch_size=24 // B,
        declared_units=24,
    )
    result = train_local(_fresh(warm_checkpoint), train, dp=dp, train=TrainConfig(steps=2), step_hook=measure)
    # 3.4M noise draws per step: the standard error of the std is ~0.04%, so 1% cannot pass by accident
    for s in stds:
        assert s == pytest.approx(sigma * C, rel=0.01)
    assert result.event.noise_multiplier == sigma and result.event.relation == "replace_one"
    assert result.event.sample_rate == q and result.event.steps == 2


def test_sampling_units_follow_the_privacy_unit(bundle_and_data):
    _, train, _ = bundle_and_data
    identity = sampling_units(
        train, DpConfig(mode=Mode.MICROBATCH, privacy_unit="identity", microbatch_size=5, declared_units=24)
    )
    for records in identity:
        patients = {train.patient_ids[r] for r in records}
        for other in identity:
            if other is not records:
                assert patients.isdisjoint({train.patient_ids[r] for r in other})
    paper = sampling_units(train, DpConfig(mode=Mode.PAPER, privacy_unit="identity"))
    assert len(paper) == len(set(train.patient_ids))
    record = sampling_units(train, DpConfig(mode=Mode.PAPER, privacy_unit="record"))
    assert len(record) == len(train)


def test_paper_mode_accounts_sensitivity_2c_under_add_or_remove(bundle_and_data, warm_checkpoint):
    _, train, _ = bundle_and_data
    dp = DpConfig(mode=Mode.PAPER, noise_multiplier=2.0, sample_rate=0.3)
    result = train_local(_fresh(warm_checkpoint, "projections"), train, dp=dp, train=TrainConfig(steps=2))
    assert result.microbatches_per_step == (1, 1)
    assert result.event.relation == "add_or_remove" and result.event.sensitivity == 2.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(max_grad_norm=-1.0), "max_grad_norm"),
        (dict(sample_rate=0.0), "sample_rate"),
        (dict(delta=1.0), "delta"),
        (dict(noise_multiplier=0.0), "noise_multiplier"),
        (dict(microbatch_size=0), "microbatch_size"),
        (dict(declared_units=0), "declared_units"),
        (dict(mode="ghost"), "ghost"),
    ],
)
def test_bad_dp_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DpConfig(**{"declared_units": 10, **kwargs})


def test_more_microbatches_than_units_trains_and_reveals_nothing(bundle_and_data, warm_checkpoint):
    """Empty micro-batches add a zero gradient; refusing them would itself reveal the unit count."""
    _, train, _ = bundle_and_data
    n_patients = len(set(train.patient_ids))
    dp = DpConfig(microbatch_size=2, declared_units=6 * n_patients, sample_rate=0.5)
    model = _fresh(warm_checkpoint, "projections")
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    result = train_local(model, train, dp=dp, train=TrainConfig(steps=2))
    assert result.event.steps == 2 and max(result.microbatches_per_step) > n_patients // 2
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def _update(warm_checkpoint, train, **kwargs) -> torch.Tensor:
    model = _fresh(warm_checkpoint, "projections")
    dp = DpConfig(mode=Mode.MICROBATCH, noise_multiplier=1.0, sample_rate=0.5, microbatch_size=6, declared_units=24)
    train_local(model, train, dp=dp, train=TrainConfig(steps=2), **kwargs)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def test_noise_and_sampling_are_secret_by_default_and_reproducible_only_on_request(bundle_and_data, warm_checkpoint):
    _, train, _ = bundle_and_data
    first, second = _update(warm_checkpoint, train), _update(warm_checkpoint, train)
    assert not torch.equal(first, second)  # OS entropy: the same call never repeats its noise
    seeded = [_update(warm_checkpoint, train, reproducible_seed=5) for _ in range(2)]
    torch.testing.assert_close(seeded[0], seeded[1], rtol=0, atol=0)


def test_training_event_is_known_before_training(bundle_and_data, warm_checkpoint):
    _, train, _ = bundle_and_data
    dp = DpConfig(mode=Mode.MICROBATCH, noise_multiplier=1.5, sample_rate=0.4, microbatch_size=8, declared_units=24)
    steps = TrainConfig(steps=2)
    result = train_local(_fresh(warm_checkpoint, "projections"), train, dp=dp, train=steps)
    assert result.event == training_event(dp, steps)


def test_unit_mode_clips_each_unit_and_accounts_add_or_remove(bundle_and_data, warm_checkpoint, public):
    _, train, _ = bundle_and_data
    n_patients = len(set(train.patient_ids))
    seen = []
    dp = DpConfig(mode=Mode.UNIT, noise_multiplier=1.0, max_grad_norm=0.05, sample_rate=0.5, declared_units=n_patients)
    result = train_local(
        _fresh(warm_checkpoint, "projections"),
        train,
        dp=dp,
        train=TrainConfig(steps=2),
        public=public,
        step_hook=lambda opt: seen.append(opt.expected_batch_size),
    )
    assert result.event.relation == "add_or_remove" and result.event.sensitivity == 1.0
    assert seen == [0.5 * n_patients] * 2  # divided by the public q x declared units, not a count of the data
    assert max(result.microbatches_per_step) <= n_patients
    with pytest.raises(ValueError, match="unit mode needs public pairs"):
        train_local(_fresh(warm_checkpoint, "projections"), train, dp=dp, train=TrainConfig(steps=1))


def test_one_unit_per_microbatch_is_add_or_remove_and_several_is_replace_one():
    one = DpConfig(microbatch_size=1, declared_units=100, sample_rate=0.1)
    several = DpConfig(microbatch_size=4, declared_units=100, sample_rate=0.1)
    assert (one.relation, one.per_unit, one.expected_terms) == ("add_or_remove", True, pytest.approx(10.0))
    assert (several.relation, several.per_unit, several.num_blocks) == ("replace_one", False, 25)
    assert several.expected_terms == pytest.approx(2.5)


def test_learning_directions(bundle_and_data, warm_checkpoint, public):
    """Non-private and generous-epsilon DP fine-tuning improve on the warm start, per micro-batch and
    per unit against public negatives; a tiny epsilon does not (its noise drowns the signal)."""
    bundle, train, test = bundle_and_data
    steps = TrainConfig(steps=40, lr=2e-3)
    runs = {
        "nonprivate": DpConfig(mode=Mode.NONPRIVATE, sample_rate=0.5),
        "generous": DpConfig(
            mode=Mode.MICROBATCH, noise_multiplier=0.15, sample_rate=0.5, microbatch_size=4, declared_units=24
        ),
        "tiny": DpConfig(
            mode=Mode.MICROBATCH, noise_multiplier=60.0, sample_rate=0.5, microbatch_size=4, declared_units=24
        ),
        "unit": DpConfig(mode=Mode.UNIT, noise_multiplier=0.3, sample_rate=0.5, declared_units=24),
    }
    warm = zero_shot_accuracy(_fresh(warm_checkpoint), bundle.tokenizer, test)
    acc, eps = {}, {}
    for label, dp in runs.items():
        scores = []
        for seed in (1, 2):  # mean over two seeds: one run's noise should not decide the direction
            model = _fresh(warm_checkpoint, "last-1")  # fewer noisy dimensions: the usual DP lever
            result = train_local(model, train, dp=dp, train=steps, reproducible_seed=seed, public=public)
            scores.append(zero_shot_accuracy(model, bundle.tokenizer, test))
        acc[label] = sum(scores) / len(scores)
        eps[label] = epsilon([result.event], delta=dp.delta)
    assert math.isinf(eps["nonprivate"]) and math.isfinite(eps["generous"]) and eps["tiny"] < 0.5
    assert acc["nonprivate"] > warm + 0.02, (warm, acc)
    assert acc["generous"] > warm + 0.02, (warm, acc)
    assert acc["tiny"] < acc["generous"], (warm, acc)
    assert acc["unit"] > warm + 0.02, (warm, acc)


def test_more_units_at_the_same_epsilon_do_not_make_utility_worse(bundle_and_data, warm_checkpoint, public):
    """Identity-level DP at one epsilon (same sigma, sample rate and steps): a site with three times
    the patients has three times the clipped signal against the same noise, so its model is at
    least as good. This is why the default hospitals have hundreds of patients."""
    bundle, train, test = bundle_and_data
    patients = list(dict.fromkeys(train.patient_ids))
    few = set(patients[: len(patients) // 3])
    small = train.subset([i for i, p in enumerate(train.patient_ids) if p in few])
    acc, eps = {}, {}
    for label, data in (("few", small), ("all", train)):
        units = len(set(data.patient_ids))
        dp = DpConfig(mode=Mode.UNIT, noise_multiplier=1.0, sample_rate=0.5, declared_units=units)
        scores = []
        for seed in (1, 2, 3):
            model = _fresh(warm_checkpoint, "last-1")
            result = train_local(
                model, data, dp=dp, train=TrainConfig(steps=30, lr=2e-3), reproducible_seed=seed, public=public
            )
            scores.append(zero_shot_accuracy(model, bundle.tokenizer, test))
        acc[label] = sum(scores) / len(scores)
        eps[label] = epsilon([result.event], delta=dp.delta)
    assert math.isfinite(eps["all"]) and eps["all"] == eps["few"]  # the same guarantee for both sizes
    assert acc["all"] >= acc["few"], acc


def test_optimizer_is_chosen_by_name_and_checked(bundle_and_data, warm_checkpoint):
    _, train, _ = bundle_and_data
    with pytest.raises(ValueError, match="optimizer: expected one of"):
        TrainConfig(optimizer="adam")
    model = _fresh(warm_checkpoint, "projections")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    dp = DpConfig(mode=Mode.MICROBATCH, noise_multiplier=1.0, sample_rate=1.0, declared_units=24)
    train_local(model, train, dp=dp, train=TrainConfig(steps=2, lr=0.01, optimizer="sgd"), reproducible_seed=0)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    from fedclip.training.local import make_optimizer

    opt = make_optimizer(model, dp, TrainConfig(optimizer="sgd"), expected_microbatches=1.0, noise_generator=None)
    assert isinstance(opt.original_optimizer, torch.optim.SGD) and opt.original_optimizer.defaults["nesterov"]
