"""Find the noise multiplier for a target (epsilon, delta): it never overshoots the target.

For ``add_or_remove`` events this starts from Opacus' ``get_noise_multiplier`` (scaled by the
sensitivity); for ``replace_one`` it bisects with the PLD accountant. Either way the answer is
checked with the same ``fedclip.privacy.accountant.epsilon`` the ledger uses, and raised until
that epsilon is within the target, so the plan and the bill agree. ``smallest_noise`` is that one
search, for any epsilon function (client-level DP uses it with its own accountant).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import replace

from opacus.accountants.utils import get_noise_multiplier

from fedclip.privacy.accountant import check_delta, epsilon
from fedclip.privacy.events import DpEvent, Mechanism, PrivacyUnit, Relation


def warn_if_delta_is_large(delta: float, num_units: int) -> None:
    """delta should be well below 1/n: a mechanism that publishes one random unit's data
    outright is (0, 1/n)-DP."""
    if num_units >= 1 and delta > 0.1 / num_units:
        warnings.warn(
            f"delta: {delta:g} is not well below 1/(number of units) = 1/{num_units}; "
            f"choose delta <= {0.1 / num_units:.2g}",
            stacklevel=2,
        )


def _event(sigma: float, *, sample_rate: float, steps: int, relation: Relation, sensitivity: float) -> DpEvent:
    return DpEvent(
        noise_multiplier=sigma,
        sample_rate=sample_rate,
        steps=steps,
        privacy_unit=PrivacyUnit.RECORD,
        relation=relation,
        sensitivity=sensitivity,
    )


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    relation: Relation,
    sensitivity: float,
    accountant: str = "prv",
    tolerance: float = 0.01,
    alongside: tuple[DpEvent, ...] = (),
) -> float:
    """The smallest noise multiplier (to within ``tolerance``) whose epsilon is <= the target.

    Parameters
    ----------
    target_epsilon : float
        The epsilon every planned step (and ``alongside``) must stay within, finite and > 0.
    delta : float
        The delta the epsilon is stated at, in (0, 1).
    sample_rate : float
        Poisson rate of the clipped terms (micro-batches or units).
    steps : int
        Every planned step, over all rounds.
    relation : Relation
        ``add_or_remove`` (Opacus' accountant) or ``replace_one`` (dp-accounting's PLD).
    sensitivity : float
        L2 sensitivity of the noisy sum in units of the clipping norm.
    accountant : str
        ``prv`` or ``rdp`` for add-or-remove events.
    tolerance : float
        Relative width at which the search stops; the answer is on the safe side of it.
    alongside : tuple[DpEvent, ...]
        Events composed with the training (released statistics), so that the target holds for
        everything the sites release, not for the training alone.
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon: expected a finite value > 0, got {target_epsilon}")
    check_delta(delta)
    if steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps}")
    relation = Relation(relation)
    if alongside and epsilon(alongside, delta=delta, accountant=accountant) >= target_epsilon:
        raise ValueError(
            f"target_epsilon: the released statistics alone cost "
            f"{epsilon(alongside, delta=delta, accountant=accountant):.3g} >= {target_epsilon}; "
            "raise their noise or the target"
        )

    def eps(sigma: float) -> float:
        e = _event(sigma, sample_rate=sample_rate, steps=steps, relation=relation, sensitivity=sensitivity)
        return epsilon(
            [e, *(replace(a, privacy_unit=e.privacy_unit) for a in alongside)], delta=delta, accountant=accountant
        )

    bracket = None
    if relation == Relation.ADD_OR_REMOVE:  # Opacus' own answer is a good start (its accountant, our check)
        high = sensitivity * get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
        )
        bracket = (high / 2, high)
    return smallest_noise(eps, target_epsilon=target_epsilon, tolerance=tolerance, bracket=bracket)


def smallest_noise(
    epsilon_of: Callable[[float], float],
    *,
    target_epsilon: float,
    tolerance: float = 0.01,
    bracket: tuple[float, float] | None = None,
) -> float:
    """The one noise search every calibration uses (local DP here, client-level DP in
    ``strategies.client_level``): the smallest sigma, to within ``tolerance``, with
    ``epsilon_of(sigma) <= target_epsilon``, on the safe side of the target by construction (the
    answer is always a sigma that was checked). ``bracket``: a (low, high) start; else doubling from 1."""
    if bracket is None:
        low, high = 0.0, 1.0
        while epsilon_of(high) > target_epsilon:
            low, high = high, 2 * high
            if high > 1e6:
                raise ValueError("target_epsilon: unreachable with any noise multiplier below 1e6")
    else:
        low, high = bracket
    while epsilon_of(high) > target_epsilon:  # guard against a start's own approximation
        low, high = high, high * 1.05
    while high - low > tolerance * high:
        mid = (low + high) / 2
        if mid > 0 and epsilon_of(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
    return high


def calibrate_skellam_noise(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    grid_l2: float,
    grid_l1: float,
    privacy_unit: PrivacyUnit = PrivacyUnit.IDENTITY,
    tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier (noise std over ``grid_l2``) whose ``steps`` Poisson-subsampled
    Skellam sums (distributed DP, ``fedclip.distributed``) stay within ``target_epsilon``: the same
    search, checked with the same accountant the ledger uses."""
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon: expected a finite value > 0, got {target_epsilon}")
    check_delta(delta)

    def eps(sigma: float) -> float:
        event = DpEvent(
            noise_multiplier=sigma,
            sample_rate=sample_rate,
            steps=steps,
            privacy_unit=privacy_unit,
            relation=Relation.ADD_OR_REMOVE,
            sensitivity=1.0,
            mechanism=Mechanism.SKELLAM,
            grid_l2=grid_l2,
            grid_l1=grid_l1,
        )
        return epsilon([event], delta=delta) if sigma > 0 else math.inf

    return smallest_noise(eps, target_epsilon=target_epsilon, tolerance=tolerance)
