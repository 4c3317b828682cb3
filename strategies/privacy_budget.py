"""Compose each site's privacy spending across rounds, and stop selecting sites that are spent.

``PrivacyBudgetStrategy(inner, ...)`` wraps any Flower strategy, the way Flower's DP wrappers
do. Before each round it asks every site's ledger "would one more round, as planned, take you
past your budget?" and shows the inner strategy only the nodes that answer no, so the inner
strategy samples among eligible sites with its own policy. The ledger is *write-ahead*
(``fedclip.privacy.ledger_store``): the planned events of every selected site are committed
before the train messages leave, and each charge is settled when the replies are in. An error
reply, a refusal or a missing reply keeps its charge; a reported event above the plan is
charged in full. A round in which a selected site failed stops the run (``SiteFailure``) unless
the successful share of the selected sites reaches ``failure_quorum``.

Replies are folded into the aggregate as they arrive and then dropped (``strategies.reducers``:
a running mean for FedAvg, the kept list for other inner strategies), so with a grid that yields
replies one by one the server holds one update at a time, not a round of them. The aggregate is
tentative until every charge is settled and the quorum is met; a failed quorum discards it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedclip.privacy.events import DpEvent, events_from_wire
from fedclip.privacy.ledger_store import LedgerStore, Status
from fedclip.privacy.policy import REFUSAL
from strategies.faults import crash_point
from strategies.reducers import reducer_for

UNAVAILABLE = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)
PRIVACY_RECORD = "privacy"  # the ConfigRecord in a train reply that carries the site's DpEvents


class SiteFailure(RuntimeError):
    """A round in which too many selected sites failed; the message names each site and reason."""


@dataclass(frozen=True)
class SiteRound:
    """One row of ``rounds.csv``: a site's state after a round (``epsilon`` = total so far)."""

    round: int
    site: str
    status: str  # trained | failed | refused | lost | not-selected
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    privacy_unit: str
    relation: str
    train_loss: float  # the noised, accounted release if the run asked for it, else empty
    selected: bool
    budget: float
    reason: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class _EligibleGrid:
    """The grid as the inner strategy should see it: only eligible nodes exist."""

    def __init__(self, grid: Grid, eligible: list[int]) -> None:
        self._grid = grid
        self._eligible = eligible

    def get_node_ids(self) -> Iterable[int]:
        return list(self._eligible)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


@dataclass(frozen=True)
class _Outcome:
    status: Status
    reason: str = ""
    reported: tuple[DpEvent, ...] = ()
    loss: float = math.nan


class PrivacyBudgetStrategy(Strategy):
    """Wrap ``strategy`` so that every site's privacy spending is charged write-ahead and no site is
    selected for a round that would take it past its budget.

    Parameters
    ----------
    strategy : Strategy
        The inner strategy (FedAvg, a median, Flower's DP wrappers); it samples among eligible sites.
    store : LedgerStore
        The server's write-ahead ledger: charges, settlements, aggregates.
    sites : Mapping[int, str]
        Node id -> site name (``discover_sites``); two nodes may not claim one site.
    budget : Callable[[str], float]
        A site's epsilon budget (at the store's delta).
    planned_events : Callable[[str], tuple[DpEvent, ...]]
        What one more round costs a site, charged before its message is sent.
    round_offset : int
        Rounds already run (a resume): ledger rows and reports use the run's round numbers.
    on_round : Callable[[list[SiteRound]], None], optional
        Receives every site's row after each round (``rounds.csv``).
    failure_quorum : float
        Share of the selected sites that must train for a round to count, in (0, 1].
    on_reply : Callable[[int, str, ArrayRecord], None], optional
        Sees each confirmed reply's arrays as it arrives, before it is folded in (the
        server-as-adversary attack, ``fedclip.attacks.replies``); its time is not the strategy's.
    on_send : Callable[[int, ArrayRecord], None], optional
        Sees the arrays each round sends (what a reply is compared with: the gradient canaries'
        server-side audit).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        store: LedgerStore,
        sites: Mapping[int, str],
        budget: Callable[[str], float],
        planned_events: Callable[[str], tuple[DpEvent, ...]],
        round_offset: int = 0,
        on_round: Callable[[list[SiteRound]], None] | None = None,
        failure_quorum: float = 1.0,
        on_reply: Callable[[int, str, ArrayRecord], None] | None = None,
        on_send: Callable[[int, ArrayRecord], None] | None = None,
    ) -> None:
        if len(set(sites.values())) != len(sites):
            raise ValueError(f"sites: two nodes claim the same site: {sorted(sites.values())}")
        if not 0 < failure_quorum <= 1:
            raise ValueError(f"failure-quorum: expected a share in (0, 1], got {failure_quorum}")
        self.strategy = strategy
        self.store = store
        self.sites = dict(sites)
        self.budget = budget
        self.planned_events = planned_events
        self.round_offset = round_offset
        self.on_round = on_round
        self.failure_quorum = failure_quorum
        self.on_reply = on_reply
        self.on_send = on_send
        self.exhausted = False
        self._selected: dict[str, int] = {}
        self._attempt = 0
        self._waited = 0.0
        self.strategy_seconds = 0.0  # this round: budget checks, charges, settlements, aggregation, report

    def server_state(self) -> dict:
        """State beyond the global model that a resumed run needs (none here: FedAvg keeps none)."""
        return {}

    def epsilons(self) -> dict[str, float]:
        return {site: self.store.ledger(site).epsilon() for site in sorted(self.sites.values())}

    def eligible_nodes(self) -> list[int]:
        """Nodes whose site can afford one more planned round (prospective check)."""
        out = []
        for node, site in sorted(self.sites.items()):
            if self.store.ledger(site).record_all(self.planned_events(site)).epsilon() <= self.budget(site):
                out.append(node)
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        started = time.perf_counter()
        try:
            return self._configure_train(server_round, arrays, config, grid)
        finally:
            self.strategy_seconds = time.perf_counter() - started

    def _configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        round_ = self.round_offset + server_round
        self._attempt = self.store.begin_round(round_)
        eligible = self.eligible_nodes()
        self._selected = {}
        if not eligible:
            if not self.exhausted:
                log(INFO, "privacy budget: no site can afford another round; remaining rounds train nothing")
            self.exhausted = True
            return []
        messages = list(self.strategy.configure_train(server_round, arrays, config, _EligibleGrid(grid, eligible)))
        self._selected = {self.sites[m.metadata.dst_node_id]: m.metadata.dst_node_id for m in messages}
        for site in sorted(self._selected):  # write-ahead: charged before anything is sent
            self.store.charge(site, round_, self.planned_events(site), attempt=self._attempt)
        crash_point("charged", round_)
        if self.on_send is not None and messages:
            try:
                self.on_send(round_, arrays)
            except Exception as exc:  # noqa: BLE001 - an observer must not stop a charged round from being sent
                log(WARNING, "round %s: the send observer failed: %s", round_, exc)
        skipped = sorted(set(self.sites.values()) - {self.sites[n] for n in eligible})
        if skipped:
            log(INFO, "privacy budget: not selecting %s (next round would exceed the budget)", skipped)
        return _SentHook(messages, round_)

    def _outcome(self, site: str, reply: Message | None) -> _Outcome:
        if reply is None:
            return _Outcome(Status.LOST, "no reply")
        if reply.has_error():
            reason = str(reply.error.reason)
            if reply.error.code in UNAVAILABLE:  # Flower answers for a node that is gone: what it did is unknown
                return _Outcome(Status.LOST, reason)
            return _Outcome(Status.REFUSED if REFUSAL in reason else Status.FAILED, reason)
        if PRIVACY_RECORD not in reply.content.config_records:
            return _Outcome(Status.FAILED, f"the reply carries no '{PRIVACY_RECORD}' record with its privacy events")
        try:
            reported = events_from_wire(reply.content[PRIVACY_RECORD]["events"])
        except (KeyError, ValueError, TypeError) as exc:
            return _Outcome(Status.FAILED, f"unreadable privacy events: {exc}")
        planned = self.planned_events(site)
        if reported != planned:
            log(
                WARNING,
                "site %s reported %s, planned %s; the ledger charges what was reported",
                site,
                reported,
                planned,
            )
        metrics = next(iter(reply.content.metric_records.values()), {})
        return _Outcome(Status.CONFIRMED, reported=reported, loss=float(metrics.get("train-loss", math.nan)))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        started = time.perf_counter()
        self._waited = 0.0
        try:
            return self._aggregate_train(server_round, replies)
        finally:  # the strategy's own time: not the time spent waiting for replies or attacking them
            self.strategy_seconds += time.perf_counter() - started - self._waited

    def _arrivals(self, replies: Iterable[Message]) -> Iterator[Message]:
        """The replies as they arrive (a windowed grid yields them one by one), timing the waits."""
        it = iter(replies)
        while True:
            started = time.perf_counter()
            reply = next(it, None)
            self._waited += time.perf_counter() - started
            if reply is None:
                return
            yield reply

    def _aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_ = self.round_offset + server_round
        reducer = reducer_for(self.strategy, server_round)  # tentative: used only if the round keeps its quorum
        seen: dict[str, _Outcome] = {}
        for reply in self._arrivals(replies):  # each reply is folded in and dropped, not kept
            site = self.sites.get(reply.metadata.src_node_id)
            if site not in self._selected:
                continue
            if site in seen:
                log(WARNING, "site %s replied twice in round %s; the second reply is ignored", site, round_)
                continue
            seen[site] = self._outcome(site, reply)
            if seen[site].status == Status.CONFIRMED:
                self._observe(round_, site, reply)
                reducer.add(reply)
        crash_point("replied", round_)
        outcomes = {site: seen.get(site) or self._outcome(site, None) for site in sorted(self._selected)}
        return self._conclude(round_, outcomes, reducer.result)

    def _conclude(
        self,
        round_: int,
        outcomes: Mapping[str, _Outcome],
        result: Callable[[], tuple[ArrayRecord | None, MetricRecord | None]],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Settle every selected site's charge, check the quorum, and only then compute ``result``
        (recorded write-ahead as an aggregate) and report the round."""
        for site, o in outcomes.items():
            self.store.settle(
                site, round_, attempt=self._attempt, status=o.status, note=o.reason[:500], reported=o.reported or None
            )
        crash_point("settled", round_)
        good = [s for s, o in outcomes.items() if o.status == Status.CONFIRMED]
        failed = {s: o for s, o in outcomes.items() if o.status != Status.CONFIRMED}
        for site, o in failed.items():
            log(
                WARNING,
                "site %s %s in round %s: %s (its planned spending stays charged)",
                site,
                o.status,
                round_,
                o.reason,
            )
        if failed and (not good or len(good) / len(outcomes) < self.failure_quorum):
            self._report(round_, outcomes)
            detail = "; ".join(f"{s} {o.status}: {o.reason}" for s, o in failed.items())
            raise SiteFailure(
                f"round {round_}: {len(failed)} of {len(outcomes)} selected sites did not train "
                f"(failure-quorum {self.failure_quorum:g}): {detail}"
            )
        if good:  # write-ahead: a mechanism the server applies to the aggregate is composed over these
            self.store.record_aggregate(round_, attempt=self._attempt)
        aggregated = result()
        crash_point("aggregated", round_)
        self._report(round_, outcomes)
        return aggregated

    def _observe(self, round_: int, site: str, reply: Message) -> None:
        if self.on_reply is None:
            return
        started = time.perf_counter()
        try:
            for arrays in reply.content.array_records.values():
                self.on_reply(round_, site, arrays)
        except Exception as exc:  # noqa: BLE001 - an observer must not stop charges from being settled
            # a reply the observer cannot read (say, arrays of the wrong shape) is refused by the
            # aggregation after settlement, where every malformed reply is refused
            log(WARNING, "round %s: the reply observer failed on %s's reply: %s", round_, site, exc)
        self._waited += time.perf_counter() - started

    def _report(self, round_: int, outcomes: Mapping[str, _Outcome]) -> None:
        if self.on_round is None:
            return
        rows = []
        for site in sorted(self.sites.values()):
            ledger = self.store.ledger(site)
            o = outcomes.get(site)
            trained = o is not None and o.status == Status.CONFIRMED
            events = o.reported if trained else self.planned_events(site)
            plan = next(
                (e for e in events if e.steps > 0), events[0]
            )  # what spent: an input release, not its zero-step training
            status = "not-selected" if o is None else ("trained" if trained else str(o.status))
            rows.append(
                SiteRound(
                    round=round_,
                    site=site,
                    status=status,
                    epsilon=ledger.epsilon(),
                    delta=ledger.delta,
                    noise_multiplier=plan.noise_multiplier,
                    sample_rate=plan.sample_rate,
                    steps=plan.steps if trained else 0,
                    privacy_unit=str(plan.privacy_unit),
                    relation=str(plan.relation),
                    train_loss=o.loss if o is not None else math.nan,
                    selected=o is not None,
                    budget=self.budget(site),
                    reason=o.reason if o is not None else "",
                )
            )
        self.on_round(rows)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log(INFO, "\t├── PrivacyBudgetStrategy over %s", type(self.strategy).__name__)
        for site in sorted(self.sites.values()):
            log(INFO, "\t│   %s: budget epsilon %s, next round %s", site, self.budget(site), self.planned_events(site))
        self.strategy.summary()


class _SentHook(list):
    """The round's messages; marks the ``sent`` phase once the grid has taken them all."""

    def __init__(self, messages: list[Message], round_: int) -> None:
        super().__init__(messages)
        self._round = round_

    def __iter__(self):
        yield from super().__iter__()
        crash_point("sent", self._round)
