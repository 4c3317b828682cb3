"""One-run audit statistics on hand-made score vectors, with answers worked out by hand."""

import math

import numpy as np
import pytest

from fedclip.attacks.one_run import audit_epsilon_lower_bound, audit_p_value, guesses_from_scores, joint_confidence


def test_all_guesses_right_with_delta_zero_has_a_closed_form():
    # p-value at eps is q^r with q = e^eps / (1 + e^eps); it equals 0.05 where q = 0.05^(1/r)
    r = 100
    q = 0.05 ** (1 / r)
    expected = math.log(q / (1 - q))
    got = audit_epsilon_lower_bound(canaries=1000, guesses=r, correct=r, delta=0.0, confidence=0.95)
    assert got == pytest.approx(expected, rel=1e-6)
    assert audit_p_value(canaries=1000, guesses=r, correct=r, epsilon=expected, delta=0.0) == pytest.approx(0.05)


def test_chance_level_guessing_certifies_nothing():
    assert audit_epsilon_lower_bound(canaries=1000, guesses=200, correct=100, delta=1e-5) == 0.0
    assert audit_epsilon_lower_bound(canaries=1000, guesses=0, correct=0, delta=1e-5) == 0.0


def test_the_bound_grows_with_correct_guesses_and_shrinks_with_delta():
    bounds = [
        audit_epsilon_lower_bound(canaries=1000, guesses=200, correct=v, delta=1e-5) for v in (120, 150, 180, 200)
    ]
    assert bounds == sorted(bounds) and bounds[0] > 0
    assert audit_epsilon_lower_bound(canaries=1000, guesses=200, correct=180, delta=1e-3) < bounds[2]


def test_the_bound_is_valid_for_randomised_response():
    """eps-DP randomised response on m canaries: over many trials the bound exceeds the true eps
    at most about 5% of the time (the test's level)."""
    rng = np.random.default_rng(0)
    eps, m, trials, over = 1.0, 200, 200, 0
    for _ in range(trials):
        included = rng.random(m) < 0.5
        keep = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
        answer = np.where(keep, included, ~included)  # what the mechanism reveals
        g = guesses_from_scores(answer.astype(float) + 1e-3 * rng.random(m), included, k_in=m // 2, k_out=m // 2)
        over += audit_epsilon_lower_bound(canaries=m, guesses=g.guesses, correct=g.correct, delta=0.0) > eps
    assert over / trials <= 0.1


def test_guesses_take_the_top_and_bottom_scores_and_abstain_in_between():
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.5])
    included = np.array([True, False, False, False, True])
    g = guesses_from_scores(scores, included, k_in=2, k_out=2)  # in: 0.9 (right), 0.8 (wrong); out: 0.1, 0.2 (right)
    assert (g.guesses, g.correct) == (4, 3)
    with pytest.raises(ValueError, match="k_in \\+ k_out <= 5"):
        guesses_from_scores(scores, included, k_in=3, k_out=3)
    with pytest.raises(ValueError, match="correct <= guesses <= canaries"):
        audit_p_value(canaries=3, guesses=4, correct=1, epsilon=1.0, delta=0.0)


def test_two_audits_over_a_run_hold_jointly_at_95_percent():
    """Each of two audits over 5 evaluations at 1 - 0.05/5 holds jointly only at about 90%: the
    per-test level must split 0.05 over both audits and every evaluation."""
    assert joint_confidence(rounds=5, audits=2) == pytest.approx(1 - 0.05 / 10)
    assert joint_confidence(rounds=5, audits=0) == joint_confidence(rounds=5, audits=1) == pytest.approx(0.99)
    failure = 2 * 5 * (1 - joint_confidence(rounds=5, audits=2))  # union bound over the ten tests
    assert failure == pytest.approx(0.05)
    with pytest.raises(ValueError, match="rounds >= 1"):
        joint_confidence(rounds=0, audits=1)


def test_the_evaluator_splits_confidence_over_its_randomised_audits(tmp_path):
    from fedclip.attacks.canary import CanaryAudit
    from fedclip.attacks.gradient_canaries import GradientCanaryAudit
    from fedclip.reporting.run_files import RunFiles
    from simulations.hospital_clip.evaluator import RoundEvaluator

    class Idia:
        name = "idia"

    attacks = [Idia(), CanaryAudit.__new__(CanaryAudit), GradientCanaryAudit.__new__(GradientCanaryAudit)]
    evaluator = RoundEvaluator(
        model=None,
        tokenizer=None,
        test=None,
        attacks=attacks,
        files=RunFiles(tmp_path),
        epsilons=dict,
        delta=1e-5,
        state_dir=tmp_path,
        round_offset=0,
        total_rounds=4,
        trained_this_round=lambda: True,
    )
    try:
        assert evaluator.confidence == pytest.approx(1 - 0.05 / 5)
        assert evaluator.audit_confidence == pytest.approx(1 - 0.05 / 10)
    finally:
        evaluator.close()
