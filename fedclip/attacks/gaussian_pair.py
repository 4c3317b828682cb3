"""The Gaussian-pair one-run audit: a certified epsilon from the canaries' full scores.

Steinke, Nasr and Jagielski's one-run bound (``fedclip.attacks.one_run``) thresholds the scores
into r guesses and can certify at most about ln(r/3) even when every guess is right: with a few
hundred canaries it cannot come near an accountant's epsilon of 4. Agrawal, Wei, Singh,
Magdon-Ismail and Zikas ("Let's ask Gauss: improved one-run privacy auditing", arXiv 2606.12733)
observe that in white-box DP-SGD a Dirac canary's score is a sum of many per-step terms (its
clipped gradient when sampled, plus the step's Gaussian noise on its coordinate), so the scores of
included and of excluded canaries are, to a central-limit approximation, two Gaussians; the
audit then compares the two Gaussians instead of counting guesses.

The contract (docs/privacy.md, "Audits"):

* **Model.** Scores of included canaries ~ N(m1, s1^2), of excluded ones ~ N(m0, s0^2),
  independent across canaries (each canary is its own coordinate, with its own noise). Canaries
  differ (their coordinates drift and scale differently), so the two samples are draws from the
  mixtures over canaries of each one's (in, out) pair; the hockey-stick divergence is jointly
  convex, so the mixtures' divergence is at most the average canary's: a mixture pair above delta
  means some canary's pair is, and the mechanism is not (eps, delta)-DP for that canary.
* **Theorem.** For two Gaussians with a common standard deviation s and means mu * s apart, the
  hockey-stick divergence is delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)
  (Balle and Wang 2018, Theorem 8; Dong, Roth and Su 2022, Corollary 2.13: mu-GDP). A mechanism
  that is (eps, delta)-DP for one canary must have delta_mu(eps) <= delta for the pair its
  output induces (post-processing), so the eps solving delta_mu(eps) = delta is a lower bound.
* **Unequal spreads.** If s1 != s0, take s = min(s1, s0) and mu = (m1 - m0) / s. For s1 >= s0 the
  set {score > m0 + c}, c = s (eps/mu + mu/2) (the equal-spread pair's optimal test), has
  P1 - e^eps P0 >= delta_mu(eps) for every eps >= mu^2/2 (then the threshold lies above m1, the
  wider P1 only puts more mass above it, and P0's mass is the equal-spread one). For s0 > s1 the
  set {score < m1 - c} does the same for (P0, P1), and DP bounds both directions. Below mu^2/2,
  delta(eps) >= delta(mu^2/2) >= delta_mu(mu^2/2), which is >= delta unless mu is tiny (about 3e-5
  at delta 1e-5; the bound is then 0). So the mechanism's eps at delta is at least the pair's.
* **Confidence.** One-sided intervals, exact under the model: Welch's t lower bound on m1 - m0 at
  (1 - confidence)/2, and chi-square upper bounds on s1 and on s0 at (1 - confidence)/4 each
  (Bonferroni). mu_low = (m1 - m0)_low / min(s1_high, s0_high) is at most the true mu with
  probability >= confidence, and so is eps(mu_low). Heavy tails, to which a model of the tails
  would be sensitive, enter only through the variance estimates.

The bound is certified *under the Gaussian model*, not distribution-free; ``normality_p`` (the
smaller of D'Agostino-Pearson's p-values of the two sides) says whether the data contradict it.
Steinke et al.'s distribution-free bound is reported beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats


def gdp_delta(mu: float, epsilon: float) -> float:
    """delta(eps) of mu-GDP: the hockey-stick divergence of N(mu, 1) from N(0, 1) at e^eps."""
    if mu <= 0:
        return 0.0
    return float(stats.norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * stats.norm.cdf(-epsilon / mu - mu / 2))


def gdp_epsilon(mu: float, *, delta: float) -> float:
    """The smallest eps >= 0 with delta_mu(eps) <= delta: mu-GDP's epsilon at ``delta``."""
    if not 0 < delta < 1:
        raise ValueError(f"gaussian-pair audit: delta must be in (0, 1), got {delta}")
    if not mu >= 0 or not math.isfinite(mu):
        raise ValueError(f"gaussian-pair audit: expected a finite mu >= 0, got {mu}")
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0
    high = 1.0
    while gdp_delta(mu, high) > delta:
        high *= 2
    return float(optimize.brentq(lambda e: gdp_delta(mu, e) - delta, 0.0, high, xtol=1e-10))


@dataclass(frozen=True)
class GaussianPairAudit:
    """``epsilon_lower_bound``: certified at the confidence asked (under the Gaussian model);
    ``epsilon_estimate``: at the point estimate of mu, no confidence (what the data look like)."""

    epsilon_lower_bound: float
    epsilon_estimate: float
    mu_lower_bound: float
    mu_estimate: float
    normality_p: float


@dataclass(frozen=True)
class GaussianPair:
    """The two sides' sample statistics, computed once; ``audit`` certifies them at any confidence."""

    n1: int
    n0: int
    v1: float
    v0: float
    gap: float
    normality_p: float

    @classmethod
    def from_scores(cls, scores: np.ndarray, included: np.ndarray) -> GaussianPair:
        scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
        if scores.shape != included.shape or scores.ndim != 1:
            raise ValueError(
                f"gaussian-pair audit: scores and inclusion must be vectors of one length, got {scores.shape}, "
                f"{included.shape}"
            )
        inside, outside = scores[included], scores[~included]
        if min(len(inside), len(outside)) < 8:
            raise ValueError(
                f"gaussian-pair audit: needs at least 8 included and 8 excluded canaries, "
                f"got {len(inside)}, {len(outside)}"
            )
        # D'Agostino-Pearson needs 20 values a side to say anything
        normality = (
            min(float(stats.normaltest(side).pvalue) for side in (inside, outside))
            if min(len(inside), len(outside)) >= 20
            else math.nan
        )
        return cls(
            n1=len(inside),
            n0=len(outside),
            v1=float(inside.var(ddof=1)),
            v0=float(outside.var(ddof=1)),
            gap=float(inside.mean() - outside.mean()),
            normality_p=normality,
        )

    def audit(self, *, delta: float, confidence: float) -> GaussianPairAudit:
        """The certified epsilon at ``delta`` and ``confidence`` (the module's contract)."""
        if not 0 < confidence < 1:
            raise ValueError(f"gaussian-pair audit: confidence must be in (0, 1), got {confidence}")
        alpha, n1, n0, v1, v0 = 1 - confidence, self.n1, self.n0, self.v1, self.v0
        se = math.sqrt(v1 / n1 + v0 / n0)
        df = se**4 / ((v1 / n1) ** 2 / (n1 - 1) + (v0 / n0) ** 2 / (n0 - 1)) if se > 0 else n1 + n0 - 2  # Welch
        gap_low = self.gap - float(stats.t.ppf(1 - alpha / 2, df)) * se
        s_high = min(math.sqrt(v * (n - 1) / stats.chi2.ppf(alpha / 4, n - 1)) for v, n in ((v1, n1), (v0, n0)))
        s_hat = math.sqrt(min(v1, v0))
        mu_low = max(0.0, gap_low) / s_high if s_high > 0 else 0.0
        mu_hat = max(0.0, self.gap) / s_hat if s_hat > 0 else 0.0
        # delta_mu(mu^2/2) grows with mu: below this the unequal-spread argument says nothing (contract)
        covered = mu_low > 0 and gdp_delta(mu_low, mu_low**2 / 2) >= delta
        return GaussianPairAudit(
            epsilon_lower_bound=gdp_epsilon(mu_low, delta=delta) if covered else 0.0,
            epsilon_estimate=gdp_epsilon(mu_hat, delta=delta) if math.isfinite(mu_hat) else math.inf,
            mu_lower_bound=mu_low,
            mu_estimate=mu_hat,
            normality_p=self.normality_p,
        )


def gaussian_pair_audit(
    scores: np.ndarray, included: np.ndarray, *, delta: float, confidence: float = 0.95
) -> GaussianPairAudit:
    """The audit of one score vector (higher: more likely included), at ``confidence``."""
    return GaussianPair.from_scores(scores, included).audit(delta=delta, confidence=confidence)
