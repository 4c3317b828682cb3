"""Private selection's accounting against dp-accounting's own RDP accountant, and its draws."""

import json
import math

import numpy as np
import pytest
from dp_accounting import dp_event as dpe
from dp_accounting.rdp import RdpAccountant

from fedclip.privacy.events import DpEvent
from fedclip.privacy.selection import Repetitions, SelectionEvent, calibrate_selection_noise


def _event(sigma=1.5, q=0.1, steps=240, **kw) -> DpEvent:
    fields = dict(privacy_unit="identity", relation="add_or_remove", sensitivity=1.0)
    return DpEvent(noise_multiplier=sigma, sample_rate=q, steps=steps, **{**fields, **kw})


def _dp_accounting(sigma, q, steps, mean, shape, delta=1e-5) -> float:
    """The independent computation: dp-accounting's RdpAccountant on its own RepeatAndSelectDpEvent."""
    one = dpe.SelfComposedDpEvent(dpe.PoissonSampledDpEvent(q, dpe.GaussianDpEvent(sigma)), steps)
    acc = RdpAccountant()
    acc.compose(dpe.RepeatAndSelectDpEvent(one, mean, shape))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize(
    "distribution,mean,shape",
    [
        ("truncated-negative-binomial", 3.0, 1.0),
        ("truncated-negative-binomial", 5.0, 0.0),
        ("truncated-negative-binomial", 4.0, 0.5),
        ("truncated-negative-binomial", 2.0, 2.0),
        ("poisson", 3.0, 1.0),
    ],
)
def test_epsilon_equals_dp_accountings_repeat_and_select(distribution, mean, shape):
    reps = Repetitions(distribution=distribution, mean=mean, shape=shape)
    search = SelectionEvent(((_event(),),), reps)
    want = _dp_accounting(1.5, 0.1, 240, mean, math.inf if distribution == "poisson" else shape)
    assert search.epsilon(delta=1e-5) == pytest.approx(want, rel=1e-9)
    single = RdpAccountant()
    single.compose(dpe.SelfComposedDpEvent(dpe.PoissonSampledDpEvent(0.1, dpe.GaussianDpEvent(1.5)), 240))
    assert search.epsilon(delta=1e-5) > single.get_epsilon(1e-5)  # the search costs more than one run


def test_candidates_with_different_events_are_bounded_by_the_worst():
    reps = Repetitions(distribution="truncated-negative-binomial", mean=3.0)
    small, large = (_event(steps=120),), (_event(steps=240),)
    both = SelectionEvent((small, large), reps).epsilon(delta=1e-5)
    assert both == pytest.approx(_dp_accounting(1.5, 0.1, 240, 3.0, 1.0), rel=1e-9)  # large dominates
    assert both > SelectionEvent((small,), reps).epsilon(delta=1e-5)
    # neither dominates (more steps at less sampling): the pointwise maximum is above both
    other = (_event(steps=480, q=0.05),)
    mixed = SelectionEvent((large, other), reps).epsilon(delta=1e-5)
    assert mixed >= max(SelectionEvent((c,), reps).epsilon(delta=1e-5) for c in (large, other)) - 1e-12


def test_sensitivity_two_is_half_the_noise_and_releases_compose():
    reps = Repetitions(distribution="poisson", mean=2.0)
    paper = SelectionEvent(((_event(sigma=3.0, sensitivity=2.0),),), reps)
    assert paper.epsilon(delta=1e-5) == pytest.approx(_dp_accounting(1.5, 0.1, 240, 2.0, math.inf), rel=1e-9)
    release = _event(sigma=20.0, q=1.0, steps=6)
    with_release = SelectionEvent(((_event(), release),), reps)
    assert with_release.epsilon(delta=1e-5) > SelectionEvent(((_event(),),), reps).epsilon(delta=1e-5)


@pytest.mark.parametrize(
    "distribution,mean,shape",
    [("truncated-negative-binomial", 3.0, 1.0), ("truncated-negative-binomial", 4.0, 0.0), ("poisson", 2.5, 1.0)],
)
def test_draws_follow_the_distribution(distribution, mean, shape):
    reps = Repetitions(distribution=distribution, mean=mean, shape=shape)
    rng = np.random.default_rng(7)
    draws = np.array([reps.draw(rng) for _ in range(20_000)])
    assert abs(draws.mean() - mean) < 0.05 * mean  # standard error about 1% of the mean here
    if distribution == "poisson":
        assert (draws == 0).any()
    else:
        assert draws.min() >= 1  # truncated: never zero candidates


def test_calibration_meets_the_target_from_below():
    reps = Repetitions(distribution="truncated-negative-binomial", mean=3.0)

    def candidates(sigma):
        return ((_event(sigma=sigma),),)

    sigma = calibrate_selection_noise(target_epsilon=4.0, delta=1e-5, repetitions=reps, candidates=candidates)
    assert _dp_accounting(sigma, 0.1, 240, 3.0, 1.0) <= 4.0
    assert _dp_accounting(sigma * 0.98, 0.1, 240, 3.0, 1.0) > 4.0  # and not far above what is needed


def test_round_trip_and_refusals():
    reps = Repetitions(distribution="truncated-negative-binomial", mean=3.0, shape=0.5)
    search = SelectionEvent(((_event(), _event(sigma=20.0, q=1.0, steps=6)), (_event(steps=100),)), reps)
    again = SelectionEvent.from_json(search.to_json())
    assert again == search and again.epsilon(delta=1e-5) == search.epsilon(delta=1e-5)
    with pytest.raises(ValueError, match="add-or-remove Gaussian"):
        SelectionEvent(((_event(relation="replace_one"),),), reps)
    with pytest.raises(ValueError, match="without noise"):
        SelectionEvent(((_event(sigma=0.0),),), reps)
    with pytest.raises(ValueError, match="different units"):
        SelectionEvent(((_event(),), (_event(privacy_unit="record"),)), reps)
    with pytest.raises(ValueError, match="mean"):
        Repetitions(distribution="poisson", mean=0.5)
    with pytest.raises(ValueError, match="distribution"):
        Repetitions(distribution="uniform", mean=3.0)
    with pytest.raises(ValueError, match="shape"):
        Repetitions(distribution="truncated-negative-binomial", mean=3.0, shape=-1.0)
    with pytest.raises(ValueError, match="missing field"):
        SelectionEvent.from_json(json.dumps({"candidates": []}))
    with pytest.raises(ValueError, match="different events"):
        search.dp_accounting_event()
