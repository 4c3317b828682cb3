"""The Gaussian-pair audit: its epsilon against dp-accounting's, its confidence, its power."""

import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution
from scipy import stats

from fedclip.attacks.gaussian_pair import gaussian_pair_audit, gdp_epsilon

DELTA = 1e-5


@pytest.mark.parametrize("mu", [0.3, 0.82, 1.0, 2.0, 4.0])
def test_the_pairs_epsilon_is_the_gaussian_mechanisms_by_dp_accounting(mu):
    # independent: dp-accounting's PLD of the Gaussian mechanism with sensitivity 1 and noise 1/mu
    pld = privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=1 / mu, value_discretization_interval=1e-4
    )
    assert gdp_epsilon(mu, delta=DELTA) == pytest.approx(pld.get_epsilon_for_delta(DELTA), abs=2e-3)
    assert gdp_epsilon(0.0, delta=DELTA) == 0.0


def _pairs(rng, *, mu: float, m: int, spread_in: float = 1.0):
    included = rng.random(m) < 0.5
    return rng.normal(size=m) * np.where(included, spread_in, 1.0) + mu * included, included


def test_an_honest_pair_is_certified_above_its_epsilon_no_more_often_than_the_confidence_allows():
    rng = np.random.default_rng(2026)
    repetitions, confidence, mu = 400, 0.9, 0.82
    truth = gdp_epsilon(mu, delta=DELTA)
    above = sum(
        gaussian_pair_audit(*_pairs(rng, mu=mu, m=512), delta=DELTA, confidence=confidence).epsilon_lower_bound > truth
        for _ in range(repetitions)
    )
    # at most 10% expected; the 99.9% quantile of Binomial(400, 0.1) keeps a true miss rate of 10% passing
    assert above <= stats.binom.ppf(0.999, repetitions, 1 - confidence), above


def test_it_certifies_most_of_the_epsilon_with_enough_canaries_and_ignores_no_signal():
    rng = np.random.default_rng(7)
    audit = gaussian_pair_audit(*_pairs(rng, mu=1.0, m=4096), delta=DELTA, confidence=0.95)
    assert 0.75 * gdp_epsilon(1.0, delta=DELTA) < audit.epsilon_lower_bound < gdp_epsilon(1.0, delta=DELTA)
    assert audit.mu_lower_bound < audit.mu_estimate and audit.normality_p > 1e-3
    none = gaussian_pair_audit(*_pairs(rng, mu=0.0, m=512), delta=DELTA, confidence=0.95)
    assert none.epsilon_lower_bound == 0.0


@pytest.mark.parametrize("spread_in", [1.5, 0.7])
def test_unequal_spreads_are_never_certified_above_the_pairs_true_epsilon(spread_in):
    """The common deviation is the smaller one: the pair's true hockey-stick divergence (computed by
    numerical integration, independently of the GDP formula) still exceeds delta at the certified epsilon."""
    from scipy import integrate

    rng = np.random.default_rng(3)
    scores, included = _pairs(rng, mu=1.0, m=4096, spread_in=spread_in)
    audit = gaussian_pair_audit(scores, included, delta=DELTA, confidence=0.95)
    assert audit.mu_estimate == pytest.approx(1.0 / min(spread_in, 1.0), rel=0.1)
    eps = audit.epsilon_lower_bound
    inside, outside = stats.norm(1.0, spread_in), stats.norm(0.0, 1.0)

    def hockey_stick(p, q):
        return integrate.quad(lambda x: max(p.pdf(x) - np.exp(eps) * q.pdf(x), 0.0), -40, 40, limit=400)[0]

    assert max(hockey_stick(inside, outside), hockey_stick(outside, inside)) >= DELTA


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="at least 8 included and 8 excluded"):
        gaussian_pair_audit(np.zeros(10), np.arange(10) < 3, delta=DELTA)
    with pytest.raises(ValueError, match="one length"):
        gaussian_pair_audit(np.zeros(10), np.zeros(9, dtype=bool), delta=DELTA)
    with pytest.raises(ValueError, match="delta"):
        gdp_epsilon(1.0, delta=0.0)
