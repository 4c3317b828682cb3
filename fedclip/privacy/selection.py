"""Private selection: run a random number of candidate trainings, release only the best one.

Hyperparameter tuning on private data spends privacy: every candidate run reads the data, and the
choice among them depends on it. Papernot and Steinke (ICLR 2022, "Hyperparameter tuning with
Renyi differential privacy", arXiv 2110.03620) bound the whole search when

1. each repetition M (hyperparameters drawn at random, independently of the data; one private
   training; a score) is (lambda, rho(lambda))-RDP at every order lambda,
2. the number of repetitions K is drawn independently of the data from a truncated negative
   binomial (shape eta >= 0, its Theorem 2; eta = 1 is geometric, eta = 0 logarithmic) or a
   Poisson distribution (its Theorem 6), and *stays secret*,
3. only the best-scoring candidate is released (its model, its hyperparameters, its score).

dp-accounting 0.6 computes that bound as ``RepeatAndSelectDpEvent(event, mean, shape)`` with its
RDP accountant; this module composes the same, so that a search is *one* event in a site's ledger.

**Candidates with different hyperparameters.** A candidate's training is an event that depends on
its hyperparameters (local steps, sample rate). M draws hyperparameters h from a fixed distribution
and releases them with the run, so its output distributions on neighbouring data sets are mixtures
with the same weights over disjoint supports, and the Renyi divergence of such a mixture is
``1/(lambda-1) log sum_h p_h exp((lambda-1) D_lambda(P_h || Q_h)) <= max_h D_lambda(P_h || Q_h)``.
So M's RDP curve is at most the pointwise maximum of the candidates' curves (``candidate_rdp``),
and that maximum is what the repeat-and-select bound is applied to. With one candidate event the
figure equals dp-accounting's for ``RepeatAndSelectDpEvent`` exactly (tested).

**Whom it holds against.** The bound is about the *released* model. Whoever sees more (the
server of a federation sees every candidate's replies, round by round; anyone who learns K, or the
scores of the candidates not chosen) faces the composition of the candidates that ran, which the
per-run ledgers record as usual. The platform prints both.

Events must be add-or-remove Gaussian ones (Poisson-subsampled or not): the RDP accountant here
has no replace-one or Skellam curve, and a search over them is refused, by name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from absl import logging as absl_logging
from dp_accounting import dp_event as dpe
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib

from fedclip.privacy.accountant import check_delta
from fedclip.privacy.calibration import smallest_noise
from fedclip.privacy.events import DpEvent, Mechanism, Relation

ORDERS: tuple[float, ...] = tuple(rdp_lib.DEFAULT_RDP_ORDERS)  # dp-accounting's RdpAccountant's own
DISTRIBUTIONS = ("truncated-negative-binomial", "poisson")


@dataclass(frozen=True, kw_only=True)
class Repetitions:
    """How many candidates a search runs: a truncated negative binomial (``shape`` eta >= 0) or a
    Poisson distribution, of mean ``mean``; drawn independently of the data, kept secret."""

    distribution: str
    mean: float
    shape: float = 1.0  # truncated negative binomial only: 1 geometric, 0 logarithmic

    def __post_init__(self) -> None:
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution: expected one of {list(DISTRIBUTIONS)}, got {self.distribution!r}")
        if not (self.mean >= 1 and math.isfinite(self.mean)):
            raise ValueError(f"mean: expected a finite mean number of candidates >= 1, got {self.mean}")
        if self.distribution == DISTRIBUTIONS[0] and not (self.shape >= 0 and math.isfinite(self.shape)):
            raise ValueError(f"shape: expected a finite value >= 0 (1 geometric, 0 logarithmic), got {self.shape}")

    @property
    def dp_shape(self) -> float:
        """The shape as dp-accounting takes it: infinity is its Poisson."""
        return math.inf if self.distribution == "poisson" else float(self.shape)

    @property
    def gamma(self) -> float:
        """The truncated negative binomial's halting probability for this mean (dp-accounting's inversion)."""
        return float(rdp_lib._gamma_truncated_negative_binomial(self.shape, self.mean))

    def draw(self, rng: np.random.Generator) -> int:
        """K, the number of candidates (0 is possible for Poisson: nothing is released)."""
        if self.distribution == "poisson":
            return int(rng.poisson(self.mean))
        if self.mean == 1:
            return 1
        gamma = self.gamma
        if self.shape == 0:  # logarithmic: P[k] proportional to (1 - gamma)^k / k
            return int(rng.logseries(1 - gamma))
        while True:  # negative binomial conditioned on k >= 1 (Papernot and Steinke, Definition 1)
            k = int(rng.negative_binomial(self.shape, gamma))
            if k >= 1:
                return k

    def to_dict(self) -> dict[str, Any]:
        return {"distribution": self.distribution, "mean": self.mean, "shape": self.shape}


def _check(events: Sequence[DpEvent]) -> None:
    for e in events:
        if e.mechanism != Mechanism.GAUSSIAN or e.relation != Relation.ADD_OR_REMOVE:
            raise ValueError(
                f"private selection: a candidate's event is {e.mechanism} {e.relation}; the search's RDP "
                "bound needs add-or-remove Gaussian events (microbatch-size 1, unit or paper mode)"
            )
        if e.steps > 0 and not e.is_private:
            raise ValueError("private selection: a candidate trains without noise; a search of it has no bound")


def candidate_rdp(events: Sequence[DpEvent], orders: Sequence[float] = ORDERS) -> np.ndarray:
    """RDP curve of one candidate's events composed (dp-accounting's exact subsampled Gaussian).
    At a few fractional orders near 1 its series may not converge; it then excludes that order
    (infinite RDP: conservative) and logs a warning per order, which is silenced here."""
    _check(events)
    total = np.zeros(len(orders))
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        for e in events:
            if e.steps == 0:
                continue
            total += e.steps * np.asarray(
                rdp_lib._compute_rdp_poisson_subsampled_gaussian(
                    e.sample_rate, e.noise_multiplier / e.sensitivity, orders
                )
            )
    finally:
        absl_logging.set_verbosity(verbosity)
    return total


@dataclass(frozen=True)
class SelectionEvent:
    """One private search at one site: the candidates' possible events (one tuple per distinct
    hyperparameter setting that changes them) and the distribution of the number of repetitions."""

    candidates: tuple[tuple[DpEvent, ...], ...]
    repetitions: Repetitions

    def __post_init__(self) -> None:
        if not self.candidates or any(not c for c in self.candidates):
            raise ValueError("private selection: expected at least one candidate, each with its events")
        units = {e.privacy_unit for c in self.candidates for e in c}
        if len(units) > 1:
            raise ValueError(f"private selection: candidates about different units {sorted(map(str, units))}")
        for c in self.candidates:
            _check(c)

    @property
    def privacy_unit(self) -> str:
        return str(self.candidates[0][0].privacy_unit)

    def rdp(self, orders: Sequence[float] = ORDERS) -> np.ndarray:
        """The search's RDP curve: repeat-and-select on the candidates' pointwise maximum."""
        worst = np.max([candidate_rdp(c, orders) for c in self.candidates], axis=0)
        return np.asarray(
            rdp_lib._compute_rdp_repeat_and_select(orders, worst, self.repetitions.mean, self.repetitions.dp_shape)
        )

    def epsilon(self, *, delta: float) -> float:
        """Epsilon at ``delta`` of the released (best) candidate, the whole search included."""
        check_delta(delta)
        eps, _ = rdp_lib.compute_epsilon(ORDERS, list(self.rdp()), delta)
        return float(eps)

    def dp_accounting_event(self) -> dpe.DpEvent:
        """dp-accounting's own event for a search with one candidate event (for checks and for users
        who compose it further); several distinct candidate events have no single such event."""
        if len(set(self.candidates)) != 1:
            raise ValueError("private selection: candidates with different events have no single dp-accounting event")
        parts = [
            dpe.SelfComposedDpEvent(
                dpe.PoissonSampledDpEvent(e.sample_rate, dpe.GaussianDpEvent(e.noise_multiplier / e.sensitivity)),
                e.steps,
            )
            for e in self.candidates[0]
            if e.steps > 0
        ]
        return dpe.RepeatAndSelectDpEvent(dpe.ComposedDpEvent(parts), self.repetitions.mean, self.repetitions.dp_shape)

    def to_json(self) -> str:
        return json.dumps(
            {"candidates": [[e.to_dict() for e in c] for c in self.candidates], **self.repetitions.to_dict()},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> "SelectionEvent":
        data = json.loads(text)
        try:
            candidates = tuple(tuple(DpEvent.from_dict(e) for e in c) for c in data["candidates"])
            reps = Repetitions(distribution=data["distribution"], mean=float(data["mean"]), shape=float(data["shape"]))
        except KeyError as exc:
            raise ValueError(f"private selection event: missing field {exc}") from exc
        return cls(candidates, reps)


def calibrate_selection_noise(
    *,
    target_epsilon: float,
    delta: float,
    repetitions: Repetitions,
    candidates: Callable[[float], tuple[tuple[DpEvent, ...], ...]],
    tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier, shared by every candidate, whose whole search costs at most
    ``target_epsilon`` at ``delta`` (``candidates(sigma)``: the candidates' events at that noise).

    Parameters
    ----------
    target_epsilon : float
        The epsilon of the released model, the search included.
    delta : float
        The delta it is stated at.
    repetitions : Repetitions
        The distribution of the number of candidates.
    candidates : Callable[[float], tuple[tuple[DpEvent, ...], ...]]
        Each distinct candidate's events at a given noise multiplier.
    tolerance : float
        Relative width at which the search stops, on the safe side (``smallest_noise``).
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target-epsilon: expected a finite value > 0, got {target_epsilon}")
    check_delta(delta)
    return smallest_noise(
        lambda sigma: SelectionEvent(candidates(sigma), repetitions).epsilon(delta=delta),
        target_epsilon=target_epsilon,
        tolerance=tolerance,
    )
