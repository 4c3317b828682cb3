import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedclip.privacy.accountant import epsilon
from fedclip.privacy.calibration import calibrate_noise_multiplier, warn_if_delta_is_large
from fedclip.privacy.events import DpEvent


def _eps(sigma, q, steps, relation, sensitivity, delta):
    e = DpEvent(
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        privacy_unit="identity",
        relation=relation,
        sensitivity=sensitivity,
    )
    return epsilon([e], delta=delta)


@settings(max_examples=8, deadline=None)
@given(
    target=st.floats(0.5, 30.0),
    q=st.floats(0.02, 1.0),
    rounds=st.integers(1, 10),
    local_steps=st.integers(1, 30),
    relation=st.sampled_from([("replace_one", 1.0), ("add_or_remove", 2.0)]),
)
def test_calibrated_noise_never_overshoots_and_is_not_wasteful(target, q, rounds, local_steps, relation):
    rel, sens = relation
    steps = rounds * local_steps
    sigma = calibrate_noise_multiplier(
        target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps, relation=rel, sensitivity=sens
    )
    assert _eps(sigma, q, steps, rel, sens, 1e-5) <= target
    assert _eps(sigma * 0.9, q, steps, rel, sens, 1e-5) > target * 0.98


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("target_epsilon", dict(target_epsilon=0.0)),
        ("target_epsilon", dict(target_epsilon=-1.0)),
        ("delta", dict(delta=1.0)),
        ("delta", dict(delta=0.0)),
        ("steps", dict(steps=0)),
    ],
)
def test_bad_targets_name_the_field(field, kwargs):
    args = dict(target_epsilon=1.0, delta=1e-5, sample_rate=0.1, steps=10, relation="replace_one", sensitivity=1.0)
    with pytest.raises(ValueError, match=field):
        calibrate_noise_multiplier(**{**args, **kwargs})


def test_large_delta_warns_and_small_delta_does_not():
    with pytest.warns(UserWarning, match="delta: .* not well below 1/\\(number of units\\)"):
        warn_if_delta_is_large(1e-2, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_delta_is_large(1e-5, 100)
