"""Accountants against the figures in shared/NOTES.md and against independent computations."""

import math
from dataclasses import replace

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from scipy import integrate, optimize, stats

from fedclip.privacy.accountant import epsilon
from fedclip.privacy.events import DpEvent
from fedclip.privacy.ledger import PrivacyLedger


def ev(sigma=1.0, q=0.01, steps=1000, relation="replace_one", sensitivity=1.0, unit="record"):
    return DpEvent(
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        privacy_unit=unit,
        relation=relation,
        sensitivity=sensitivity,
    )


def test_reference_figures_for_the_three_ways_to_account():
    # sigma 1, q 0.01, 1000 steps, delta 1e-5 (NOTES section 1, computed with dp-accounting PLDs)
    unsound = epsilon([ev(relation="add_or_remove", sensitivity=1.0)], delta=1e-5)
    loose = epsilon([ev(relation="add_or_remove", sensitivity=2.0)], delta=1e-5)
    tight = epsilon([ev(relation="replace_one")], delta=1e-5)
    assert unsound == pytest.approx(1.83, abs=0.05)
    assert loose == pytest.approx(13.4, abs=0.3)
    assert tight == pytest.approx(2.84, abs=0.03)
    assert unsound < tight < loose


def _exact_replace_one_epsilon(sigma: float, q: float, delta: float) -> float:
    """One step of the replace-one subsampled Gaussian by direct numerical integration of the
    hockey-stick divergence between (1-q)N(0)+qN(-1) and (1-q)N(0)+qN(+1); independent of
    dp-accounting."""
    p = lambda x: (1 - q) * stats.norm.pdf(x, 0, sigma) + q * stats.norm.pdf(x, -1, sigma)  # noqa: E731
    r = lambda x: (1 - q) * stats.norm.pdf(x, 0, sigma) + q * stats.norm.pdf(x, 1, sigma)  # noqa: E731

    def hockey(eps: float) -> float:
        return integrate.quad(
            lambda x: max(0.0, p(x) - math.exp(eps) * r(x)),
            -12 * sigma - 1,
            12 * sigma + 1,
            limit=400,
            points=[-1, 0, 1],
        )[0]

    return optimize.brentq(lambda e: hockey(e) - delta, 1e-6, 50)


@pytest.mark.parametrize(("sigma", "q"), [(1.0, 0.5), (2.0, 0.2), (0.7, 0.05)])
def test_replace_one_single_step_matches_numerical_integration(sigma, q):
    exact = _exact_replace_one_epsilon(sigma, q, 1e-5)
    ours = epsilon([ev(sigma=sigma, q=q, steps=1)], delta=1e-5)
    assert ours >= exact * (1 - 1e-4)  # an upper bound (up to the quadrature's own error)...
    assert ours <= exact * 1.02 + 0.01  # ...and a tight one


@pytest.mark.parametrize("sigma", [0.8, 1.5, 4.0])
def test_replace_one_without_subsampling_is_the_gaussian_with_shift_2c(sigma):
    """q = 1: N(-C) against N(+C), the Gaussian mechanism with sensitivity 2C, whose privacy
    profile has a closed form (Balle and Wang 2018)."""
    mu = 2 / sigma
    profile = lambda e: stats.norm.cdf(-e / mu + mu / 2) - math.exp(e) * stats.norm.cdf(-e / mu - mu / 2)  # noqa: E731
    exact = optimize.brentq(lambda e: profile(e) - 1e-5, 1e-6, 80)
    ours = epsilon([ev(sigma=sigma, q=1.0, steps=1)], delta=1e-5)
    assert exact <= ours <= exact * 1.001 + 1e-3


def test_add_or_remove_matches_an_independent_rdp_computation():
    # Opacus' PRV (our default) against Opacus' RDP on the same mechanism: RDP is looser, never tighter.
    e = ev(sigma=1.2, q=0.05, steps=300, relation="add_or_remove", sensitivity=2.0)
    prv = epsilon([e], delta=1e-5, accountant="prv")
    rdp = RDPAccountant()
    rdp.history = [(0.6, 0.05, 300)]
    assert prv <= rdp.get_epsilon(1e-5) + 1e-9
    assert prv == pytest.approx(epsilon([e], delta=1e-5, accountant="rdp"), rel=0.35)


def test_sensitivity_two_is_half_the_noise():
    a = epsilon([ev(sigma=3.0, q=0.1, steps=50, relation="add_or_remove", sensitivity=2.0)], delta=1e-5)
    b = epsilon([ev(sigma=1.5, q=0.1, steps=50, relation="add_or_remove", sensitivity=1.0)], delta=1e-5)
    assert a == pytest.approx(b, rel=1e-9)


@pytest.mark.parametrize(("relation", "sensitivity"), [("replace_one", 1.0), ("add_or_remove", 2.0)])
def test_composing_rounds_equals_one_accountant_over_all_steps(relation, sensitivity):
    ledger = PrivacyLedger(delta=1e-5)
    for _ in range(5):
        ledger = ledger.record(
            ev(sigma=1.0, q=0.3, steps=20, relation=relation, sensitivity=sensitivity, unit="identity")
        )
    whole = epsilon([ev(sigma=1.0, q=0.3, steps=100, relation=relation, sensitivity=sensitivity)], delta=1e-5)
    assert ledger.steps == 100
    assert ledger.epsilon() == pytest.approx(whole, rel=0.01)


def test_epsilon_moves_the_right_way():
    base = epsilon([ev(sigma=1.0, q=0.3, steps=50)], delta=1e-5)
    assert epsilon([ev(sigma=1.0, q=0.3, steps=100)], delta=1e-5) > base
    assert epsilon([ev(sigma=2.0, q=0.3, steps=50)], delta=1e-5) < base
    assert epsilon([ev(sigma=1.0, q=0.1, steps=50)], delta=1e-5) < base
    assert epsilon([ev(sigma=1.0, q=0.3, steps=50)], delta=1e-3) < base


def test_nonprivate_and_empty():
    assert epsilon([ev(sigma=0.0)], delta=1e-5) == math.inf
    assert epsilon([], delta=1e-5) == 0.0
    assert epsilon([ev(steps=0)], delta=1e-5) == 0.0


def test_mixed_relations_compose_through_pld_and_cost_more_than_either():
    a = ev(sigma=1.0, q=0.2, steps=30)
    b = ev(sigma=2.0, q=0.2, steps=30, relation="add_or_remove", sensitivity=2.0)
    both = epsilon([a, b], delta=1e-5)
    assert both > max(epsilon([a], delta=1e-5), epsilon([b], delta=1e-5))


def test_ledger_refuses_mixed_units_and_bad_delta():
    with pytest.raises(ValueError, match="privacy_unit"):
        PrivacyLedger(delta=1e-5, events=(ev(unit="record"), ev(unit="identity")))
    for delta in (0.0, 1.0, -1e-5):
        with pytest.raises(ValueError, match="delta"):
            PrivacyLedger(delta=delta)


def test_prospective_check_does_not_spend():
    ledger = PrivacyLedger(delta=1e-5).record(ev(sigma=1.0, q=0.3, steps=20))
    spent = ledger.epsilon()
    nxt = ev(sigma=1.0, q=0.3, steps=20)
    after = ledger.epsilon_if(nxt)
    assert after > spent and ledger.epsilon() == spent
    assert ledger.would_exceed(nxt, budget=(spent + after) / 2)
    assert not ledger.would_exceed(nxt, budget=after + 1e-6)
    assert np.isfinite(after)


def test_rounds_of_one_mechanism_are_accounted_as_one_with_the_steps_summed():
    """The merge is the same composition: it equals accounting every round's event separately."""
    from dataclasses import replace

    from fedclip.privacy import accountant as acc
    from fedclip.privacy.events import DpEvent

    e = DpEvent(
        noise_multiplier=1.2,
        sample_rate=0.1,
        steps=20,
        privacy_unit="identity",
        relation="add_or_remove",
        sensitivity=1.0,
    )
    other = replace(e, noise_multiplier=2.0)
    rounds = [e, other] * 4
    assert acc._merged(rounds) == tuple(sorted((replace(e, steps=80), replace(other, steps=80)), key=repr))
    separate = acc._opacus_epsilon(rounds, 1e-5, "prv")
    assert acc.epsilon(rounds, delta=1e-5) == pytest.approx(separate, rel=1e-6)


def test_a_ledger_with_distributed_rounds_composes_in_rdp_checked_by_hand():
    """Skellam sums (distributed DP) beside a Gaussian: the composed epsilon is the RDP sum of the
    Skellam bound and dp-accounting's Gaussian, converted by dp-accounting, here built independently."""
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

    from fedclip.distributed.accounting import ORDERS, SkellamSumEvent, rdp_curve
    from fedclip.privacy.events import DpEvent, Mechanism, PrivacyUnit, Relation

    sk = DpEvent(
        noise_multiplier=2.0,
        sample_rate=0.1,
        steps=30,
        privacy_unit=PrivacyUnit.IDENTITY,
        relation=Relation.ADD_OR_REMOVE,
        sensitivity=1.0,
        mechanism=Mechanism.SKELLAM,
        grid_l2=3300.0,
        grid_l1=3300.0**2,
    )
    gauss = DpEvent(
        noise_multiplier=1.5,
        sample_rate=0.1,
        steps=20,
        privacy_unit=PrivacyUnit.IDENTITY,
        relation=Relation.ADD_OR_REMOVE,
        sensitivity=1.0,
    )
    acc = dp_accounting.rdp.RdpAccountant(list(ORDERS))
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.5)), 20)
    skellam_curve = rdp_curve(
        [SkellamSumEvent(variance=(2.0 * 3300.0) ** 2, l1=3300.0**2, l2=3300.0, sample_rate=0.1, steps=30)]
    )
    by_hand = rdp_lib.compute_epsilon(list(ORDERS), list(acc._rdp + skellam_curve), 1e-5)[0]
    assert epsilon([sk, gauss], delta=1e-5) == pytest.approx(by_hand, rel=1e-9)
    assert epsilon([sk], delta=1e-5) < epsilon([sk, gauss], delta=1e-5)
    assert DpEvent.from_json(sk.to_json()) == sk and "mechanism" not in gauss.to_json()
    # replace-one events have no RDP here: basic composition, each half of delta
    mixed = [sk, replace(gauss, relation=Relation.REPLACE_ONE)]
    halves = epsilon([sk], delta=5e-6) + epsilon([mixed[1]], delta=5e-6)
    assert epsilon(mixed, delta=1e-5) == pytest.approx(halves, rel=1e-9)
