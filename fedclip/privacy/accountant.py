"""Epsilon of a sequence of privacy events, with the accountant that fits their relation.

* All events ``add_or_remove``: Opacus' accountant (``prv``, its default and tight, or ``rdp``),
  fed the Poisson-subsampled Gaussian with noise multiplier ``sigma / sensitivity``.
* Any event ``replace_one``: Opacus' accountants assume add-or-remove and would under-count, so
  every event goes through Google dp-accounting's privacy loss distributions (PLD), each with
  its own relation (``REPLACE_ONE`` or ``ADD_OR_REMOVE_ONE``) and sensitivity; the guarantee of
  every event is about the same data-set relation (add or remove one unit), so they compose.

Every figure is an upper bound: PRV returns its upper estimate, RDP is an upper bound by
construction, and PLDs are built with ``pessimistic_estimate=True``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import replace
from functools import lru_cache

import numpy as np
from dp_accounting import NeighboringRelation
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.rdp import rdp_privacy_accountant as rdp_lib  # pinned 0.6: its exact subsampled-Gaussian RDP
from opacus.accountants import create_accountant

from fedclip.distributed.accounting import ORDERS as DISTRIBUTED_ORDERS
from fedclip.distributed.accounting import SkellamSumEvent, rdp_curve
from fedclip.privacy.events import DpEvent, Mechanism, Relation

OPACUS_ACCOUNTANTS = ("prv", "rdp")
PLD_DISCRETIZATION = 1e-3


def check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta: expected a value in (0, 1), got {delta}")


def gaussian_pld(
    *, noise_multiplier: float, sensitivity: float, sample_rate: float, steps: int, relation: Relation
) -> pld_lib.PrivacyLossDistribution:
    """Pessimistic PLD of ``steps`` Poisson-subsampled Gaussians (noise std = ``noise_multiplier``)."""
    single = pld_lib.from_gaussian_mechanism(
        standard_deviation=noise_multiplier,
        sensitivity=sensitivity,
        sampling_prob=sample_rate,
        neighboring_relation=(
            NeighboringRelation.REPLACE_ONE
            if Relation(relation) == Relation.REPLACE_ONE
            else NeighboringRelation.ADD_OR_REMOVE_ONE
        ),
        value_discretization_interval=PLD_DISCRETIZATION,
        pessimistic_estimate=True,
    )
    return single.self_compose(steps)


@lru_cache(maxsize=4096)
def _event_pld(event: DpEvent) -> pld_lib.PrivacyLossDistribution:
    return gaussian_pld(
        noise_multiplier=event.noise_multiplier,
        sensitivity=event.sensitivity,
        sample_rate=event.sample_rate,
        steps=event.steps,
        relation=event.relation,
    )


def _pld_epsilon(events: list[DpEvent], delta: float) -> float:
    total = _event_pld(events[0])
    for event in events[1:]:
        total = total.compose(_event_pld(event))
    return float(total.get_epsilon_for_delta(delta))


def _opacus_epsilon(events: list[DpEvent], delta: float, accountant: str) -> float:
    acc = create_accountant(mechanism=accountant)
    acc.history = [(e.noise_multiplier / e.sensitivity, e.sample_rate, e.steps) for e in events]
    return float(acc.get_epsilon(delta=delta))


def epsilon(events: Iterable[DpEvent], *, delta: float, accountant: str = "prv") -> float:
    """Epsilon at ``delta`` of all ``events`` composed; ``inf`` if any event is non-private."""
    check_delta(delta)
    if accountant not in OPACUS_ACCOUNTANTS:
        raise ValueError(f"accountant: expected one of {OPACUS_ACCOUNTANTS}, got {accountant!r}")
    return _composed_epsilon(_merged(e for e in events if e.steps > 0), delta, accountant)


def _merged(events: Iterable[DpEvent]) -> tuple[DpEvent, ...]:
    """Events that differ only in ``steps`` as one event with the steps summed: the same
    composition (composition is commutative, and k steps then l steps of one mechanism are k + l
    steps of it), but one PRV/PLD to build instead of one per round, which made a twelve-round
    ledger cost seconds per query."""
    steps: dict[DpEvent, int] = {}
    for e in events:
        key = replace(e, steps=0)
        steps[key] = steps.get(key, 0) + e.steps
    return tuple(sorted((replace(k, steps=n) for k, n in steps.items()), key=repr))


@lru_cache(maxsize=4096)
def _composed_epsilon(spent: tuple[DpEvent, ...], delta: float, accountant: str) -> float:
    """Cached: a strategy asks for the same ledger's epsilon several times a round."""
    if not spent:
        return 0.0
    if any(not e.is_private for e in spent):
        return math.inf
    if any(e.mechanism == Mechanism.SKELLAM for e in spent):
        replace_one = [e for e in spent if e.relation == Relation.REPLACE_ONE]
        if replace_one:  # no one accountant composes both: basic composition, delta split in two halves
            rest = [e for e in spent if e.relation != Relation.REPLACE_ONE]
            return _rdp_epsilon(rest, delta / 2) + _pld_epsilon(replace_one, delta / 2)
        return _rdp_epsilon(list(spent), delta)
    if all(e.relation == Relation.ADD_OR_REMOVE for e in spent):
        return _opacus_epsilon(list(spent), delta, accountant)
    return _pld_epsilon(list(spent), delta)


def _rdp_epsilon(events: list[DpEvent], delta: float) -> float:
    """Skellam sums (distributed DP) have a Renyi DP bound and no PLD: the add-or-remove events of a
    ledger are composed in RDP at integer orders, the Gaussians with dp-accounting's exact RDP of the
    Poisson-subsampled Gaussian, the Skellam sums with ``fedclip.distributed.accounting``. Replace-one
    events (micro-batches of several units) have no RDP here: ``_composed_epsilon`` adds their PLD
    epsilon at half the delta to this one at the other half (basic composition: conservative)."""
    orders = list(DISTRIBUTED_ORDERS)
    total = np.zeros(len(orders))
    for e in events:
        if e.mechanism == Mechanism.SKELLAM:
            sk = SkellamSumEvent(
                variance=(e.noise_multiplier * e.grid_l2) ** 2,
                l1=e.grid_l1,
                l2=e.grid_l2,
                sample_rate=e.sample_rate,
                steps=e.steps,
            )
            total += rdp_curve([sk], orders)
        else:
            total += e.steps * np.asarray(
                rdp_lib._compute_rdp_poisson_subsampled_gaussian(
                    e.sample_rate, e.noise_multiplier / e.sensitivity, orders
                )
            )
    eps, _ = rdp_lib.compute_epsilon(orders, list(total), delta)
    return float(eps)
