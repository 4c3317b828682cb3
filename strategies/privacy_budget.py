"""Compose each site's privacy spending across rounds, and stop selecting sites that are spent.

``PrivacyBudgetStrategy(inner, ...)`` wraps any Flower strategy, the way Flower's DP wrappers
do. Before each round it asks every site's ledger "would one more round, as planned, take you
past your budget?" and shows the inner strategy only the nodes that answer no, so the inner
strategy samples among eligible sites with its own policy. After the round it writes every
reply's privacy event to the durable ledger store *before* the inner strategy aggregates the
updates. Budgets and the planned next event are injected callables, so per-site budgets and
calibrated plans need no subclass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedclip.privacy.events import DpEvent
from strategies.ledger_store import LedgerStore

PRIVACY_RECORD = "privacy"  # the ConfigRecord in a train reply that carries the site's DpEvent


@dataclass(frozen=True)
class SiteRound:
    """One row of ``rounds.csv``: a site's state after a round (``epsilon`` = total so far)."""

    round: int
    site: str
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    privacy_unit: str
    relation: str
    train_loss: float
    selected: bool
    budget: float

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


class PrivacyBudgetStrategy(Strategy):
    def __init__(
        self,
        strategy: Strategy,
        *,
        store: LedgerStore,
        sites: Mapping[int, str],
        budget: Callable[[str], float],
        planned_event: Callable[[str], DpEvent],
        round_offset: int = 0,
        on_round: Callable[[list[SiteRound]], None] | None = None,
    ) -> None:
        if len(set(sites.values())) != len(sites):
            raise ValueError(f"sites: two nodes claim the same site: {sorted(sites.values())}")
        self.strategy = strategy
        self.store = store
        self.sites = dict(sites)
        self.budget = budget
        self.planned_event = planned_event
        self.round_offset = round_offset
        self.on_round = on_round
        self.exhausted = False
        self._selected: set[str] = set()

    def epsilons(self) -> dict[str, float]:
        return {site: self.store.ledger(site).epsilon() for site in sorted(self.sites.values())}

    def eligible_nodes(self) -> list[int]:
        """Nodes whose site can afford one more planned round (prospective check)."""
        out = []
        for node, site in sorted(self.sites.items()):
            if not self.store.ledger(site).would_exceed(self.planned_event(site), budget=self.budget(site)):
                out.append(node)
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        eligible = self.eligible_nodes()
        if not eligible:
            if not self.exhausted:
                log(INFO, "privacy budget: no site can afford another round; remaining rounds train nothing")
            self.exhausted = True
            self._selected = set()
            return []
        messages = list(self.strategy.configure_train(server_round, arrays, config, _EligibleGrid(grid, eligible)))
        self._selected = {self.sites[m.metadata.dst_node_id] for m in messages}
        skipped = sorted(set(self.sites.values()) - {self.sites[n] for n in eligible})
        if skipped:
            log(INFO, "privacy budget: not selecting %s (next round would exceed the budget)", skipped)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        round_ = self.round_offset + server_round
        losses: dict[str, float] = {}
        reported: dict[str, DpEvent] = {}
        for reply in replies:
            if reply.has_error():
                continue
            site = self.sites[reply.metadata.src_node_id]
            if PRIVACY_RECORD not in reply.content.config_records:
                raise ValueError(f"reply from site {site!r} carries no '{PRIVACY_RECORD}' record with its privacy event")
            event = DpEvent.from_dict(dict(reply.content[PRIVACY_RECORD]))
            planned = self.planned_event(site)
            if event != planned:
                log(WARNING, "site %s reported %s, planned %s; the ledger records what was reported", site, event, planned)
            self.store.append(site, round_, event)  # durable before aggregation
            reported[site] = event
            metrics = next(iter(reply.content.metric_records.values()), {})
            losses[site] = float(metrics.get("train-loss", math.nan))
        aggregated = self.strategy.aggregate_train(server_round, replies)
        self._report(round_, losses, reported)
        return aggregated

    def _report(self, round_: int, losses: Mapping[str, float], reported: Mapping[str, DpEvent]) -> None:
        if self.on_round is None:
            return
        rows = []
        for site in sorted(self.sites.values()):
            ledger = self.store.ledger(site)
            trained = site in reported
            plan = reported[site] if trained else self.planned_event(site)
            rows.append(SiteRound(
                round=round_, site=site, epsilon=ledger.epsilon(), delta=ledger.delta,
                noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                steps=plan.steps if trained else 0, privacy_unit=str(plan.privacy_unit), relation=str(plan.relation),
                train_loss=losses.get(site, math.nan), selected=trained, budget=self.budget(site),
            ))
        self.on_round(rows)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        log(INFO, "\t├── PrivacyBudgetStrategy over %s", type(self.strategy).__name__)
        for site in sorted(self.sites.values()):
            log(INFO, "\t│   %s: budget epsilon %s, next round %s", site, self.budget(site), self.planned_event(site))
        self.strategy.summary()
