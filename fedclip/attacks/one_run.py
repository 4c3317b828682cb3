"""The statistics of one-run auditing (Steinke, Nasr and Jagielski, "Privacy Auditing with One
(1) Training Run", NeurIPS 2023, arXiv:2305.08846, Theorem 5.2 and Appendix D).

m canaries are each included in training independently with probability 1/2. After one training
run the auditor scores every canary, guesses "included" for the k+ highest scores and "excluded"
for the k- lowest, and abstains on the rest: r = k+ + k- guesses, v of them correct. If training
is (epsilon, delta)-DP with respect to one canary, the number of correct guesses is stochastically
dominated by Binomial(r, e^epsilon / (1 + e^epsilon)) up to a delta term, so a large v is
unlikely; the largest epsilon that the observed v rejects at the chosen confidence is a valid
lower bound on the mechanism's epsilon, from a single run. Unlike the IDIA bound beside it, it
needs no independence between the decisions: the canaries' inclusion is what is randomised.

Written from the paper's statement of the test; the p-value is

    P[V >= v] <= P[Bin(r, q) >= v] + 2 m delta max_{1 <= i <= v} P[v - i <= Bin(r, q) < v] / i,
    q = e^epsilon / (1 + e^epsilon).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


def joint_confidence(*, rounds: int, audits: int, level: float = 0.95) -> float:
    """Each test's confidence so that ``audits`` randomised audits over ``rounds`` evaluations hold
    jointly at ``level`` (Bonferroni over every audit and round: two audits at 95% each would hold
    jointly at only about 90%)."""
    if rounds < 1 or audits < 0:
        raise ValueError(f"joint confidence: expected rounds >= 1 and audits >= 0, got {rounds}, {audits}")
    return 1 - (1 - level) / (rounds * max(1, audits))


def run_confidences(*, rounds: int, attacks: Sequence[object]) -> tuple[float, float]:
    """(each indicative bound's, each certified bound's) confidence for ``attacks`` evaluated
    ``rounds`` times, so that each kind holds jointly at 95%: indicative bounds over the rounds,
    certified ones over the rounds and every randomised audit (``randomised = True``) among them."""
    audits = sum(bool(getattr(a, "randomised", False)) for a in attacks)
    return joint_confidence(rounds=rounds, audits=1), joint_confidence(rounds=rounds, audits=audits)


def audit_p_value(*, canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The probability of at least ``correct`` right guesses out of ``guesses`` if training were
    (epsilon, delta)-DP per canary, with ``canaries`` randomised canaries (the paper's p-value)."""
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(
            f"one-run audit: expected 0 <= correct <= guesses <= canaries, got {correct}, {guesses}, {canaries}"
        )
    if not epsilon >= 0 or not 0 <= delta <= 1:
        raise ValueError(f"one-run audit: expected epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = 1 / (1 + math.exp(-epsilon))
    tail = float(stats.binom.sf(correct - 1, guesses, q))
    below = np.cumsum(stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, q))  # P[v-i <= Bin < v], i = 1..v
    spread = float(np.max(below / np.arange(1, correct + 1))) if correct > 0 else 0.0
    return min(1.0, tail + 2 * canaries * delta * spread)


def audit_epsilon_lower_bound(
    *, canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95, iterations: int = 40
) -> float:
    """The largest epsilon rejected at ``confidence``: with that probability the mechanism is not
    (epsilon, delta)-DP for any smaller epsilon. 0 when the guesses are no better than chance."""
    if not 0 < confidence < 1:
        raise ValueError(f"one-run audit: confidence must be in (0, 1), got {confidence}")
    level = 1 - confidence

    def rejected(eps: float) -> bool:
        return audit_p_value(canaries=canaries, guesses=guesses, correct=correct, epsilon=eps, delta=delta) < level

    if guesses == 0 or not rejected(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while rejected(high):
        low, high = high, high * 2
        if high > 1e3:  # v = r with delta = 0 rejects ever larger epsilon only as r grows; cap the search
            return low
    for _ in range(iterations):
        mid = (low + high) / 2
        low, high = (mid, high) if rejected(mid) else (low, mid)
    return low


@dataclass(frozen=True)
class Guesses:
    guesses: int
    correct: int


def guesses_from_scores(scores: np.ndarray, included: np.ndarray, *, k_in: int, k_out: int) -> Guesses:
    """Guess "included" for the ``k_in`` highest scores and "excluded" for the ``k_out`` lowest;
    abstain on the rest. Ties are broken by position, never by the truth."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError(
            f"one-run audit: scores and inclusion must be vectors of one length, got {scores.shape}, {included.shape}"
        )
    if k_in < 0 or k_out < 0 or k_in + k_out > len(scores):
        raise ValueError(f"one-run audit: expected k_in, k_out >= 0 and k_in + k_out <= {len(scores)} canaries")
    order = np.argsort(-scores, kind="stable")
    top, bottom = order[:k_in], order[len(order) - k_out :] if k_out else order[:0]
    return Guesses(guesses=k_in + k_out, correct=int(included[top].sum() + (~included[bottom]).sum()))


@dataclass(frozen=True)
class OneRunAudit:
    epsilon_lower_bound: float
    guesses: int
    correct: int


GUESS_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)  # of the canaries, on each side: fixed before any score is seen


def audit_scores(scores: np.ndarray, included: np.ndarray, *, delta: float, confidence: float = 0.95) -> OneRunAudit:
    """The one-run audit of one score vector: for each fixed guess count k (``GUESS_FRACTIONS`` of
    the m canaries, k guessed in and k guessed out), the bound at confidence 1 - (1 - confidence)/K
    (Bonferroni over the K counts tried), and the largest of them: valid at ``confidence``,
    because the counts are fixed in advance and never chosen by looking at the outcome alone."""
    m = len(np.asarray(scores))
    counts = sorted({max(1, int(m * f)) for f in GUESS_FRACTIONS if 2 * max(1, int(m * f)) <= m})
    if not counts:
        raise ValueError(f"one-run audit: needs at least 2 canaries, got {m}")
    level = 1 - (1 - confidence) / len(counts)
    best = OneRunAudit(0.0, 0, 0)
    for k in counts:
        g = guesses_from_scores(scores, included, k_in=k, k_out=k)
        bound = audit_epsilon_lower_bound(
            canaries=m, guesses=g.guesses, correct=g.correct, delta=delta, confidence=level
        )
        if bound > best.epsilon_lower_bound or best.guesses == 0:
            best = OneRunAudit(bound, g.guesses, g.correct)
    return best
