"""Rounds over secure aggregation: federated DP-SGD (patient level) or client-level DP in shares (site level).

Patient level (dp-mode distributed): each round one DP-SGD step over every site's data. Site level
(secure-agg with client-dp-epsilon): each site's clipped update plus its share of the client-level
noise; the server applies the mean of the decoded sum.

``DistributedDpStrategy`` is the budget strategy (``strategies.privacy_budget``: write-ahead
charges, site policies, quorum, rounds.csv) with the round's exchange replaced. Instead of one
train message and one reply per site, the round is one secure sum (``strategies.secure_sum``:
Flower's SecAgg+) of every selected site's contribution: its clipped sum on the integer grid plus
its Skellam share (``fedclip.training.distributed``). The server decodes the sum, divides it by
the public expected number of sampled units (the sample rate times the units the summed sites
declared) and takes its optimizer step on the global model: post-processing of the sum.

Only the sum's total is private against the server; what it still sees in clear is each site's
report (its privacy events and declared size, both public) and who answered which stage. The
shares in each sum (the plan's share for every site whose masked vector it holds) are recorded
write-ahead, before the server can unmask it (``LedgerStore.record_secure_sum``), so the epsilon
per adversary (``distributed_report``) survives a crash and a resume, and a sum that was recorded
but never unmasked counts as released.
"""

from __future__ import annotations

import json
import math

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from fedclip.distributed.accounting import SkellamSumEvent, epsilon
from fedclip.distributed.adversaries import ADVERSARIES, adversary_variances
from fedclip.distributed.grid import Grid as IntegerGrid
from fedclip.models.arrays import load_arrays, model_to_arrays
from fedclip.privacy.events import DpEvent, events_from_wire
from fedclip.privacy.ledger_store import Status
from fedclip.privacy.policy import REFUSAL
from fedclip.training.distributed import add_gradient, trainable
from strategies.faults import crash_point
from strategies.privacy_budget import PrivacyBudgetStrategy, _Outcome
from strategies.secure_sum import SecureSumFailed, secure_sum

EVENTS_KEY = "privacy-events"  # in a site's clear report: its events as a JSON list
UNITS_KEY = "declared-units"  # in a site's clear report: its public size


class ServerStep:
    """The global model's optimizer at the server: AdamW (or Nesterov SGD) on the decoded mean gradient."""

    def __init__(
        self, model: torch.nn.Module, *, lr: float, optimizer: str = "adamw", state: dict | None = None
    ) -> None:
        """``state``: a ``state_dict()`` saved with the global model, so a resumed run keeps its moments."""
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = (
            torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
            if optimizer == "sgd"
            else torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        )
        if state:
            self.optimizer.load_state_dict(state["optimizer"])

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def __call__(self, arrays: ArrayRecord, gradient: torch.Tensor) -> ArrayRecord:
        load_arrays(self.model, arrays)
        add_gradient(self.model, gradient)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return model_to_arrays(self.model, trainable_only=True)

    def apply_update(self, arrays: ArrayRecord, update: torch.Tensor) -> ArrayRecord:
        """Site level: the global model plus the mean of the sites' clipped updates (FedAvg of deltas)."""
        load_arrays(self.model, arrays)
        with torch.no_grad():
            offset = 0
            for _, p in trainable(self.model):
                p.add_(update[offset : offset + p.numel()].reshape(p.shape).to(p.dtype))
                offset += p.numel()
        return model_to_arrays(self.model, trainable_only=True)


class DistributedDpStrategy(PrivacyBudgetStrategy):
    """The budget strategy whose rounds are secure sums of the sites' noisy clipped sums.

    Parameters
    ----------
    inner, store, sites, budget, planned_events, round_offset, on_round, failure_quorum
        As ``PrivacyBudgetStrategy`` (the inner strategy only selects the sites).
    grid_spec : fedclip.distributed.grid.Grid
        The integer grid of the sum (scale, bits, coordinates).
    threshold : int
        Sites that must stay for the sum to be decoded (SecAgg+'s reconstruction threshold).
    sample_rate : float
        The Poisson rate of units at every site: the divisor is it times the declared units.
    share_variance : float
        The Skellam variance every site adds (the plan's); the sum holds one per site in it.
    step : ServerStep
        The server's optimizer, applied to the decoded mean gradient.
    level : str
        ``patient`` (one DP-SGD step over the sites' clipped sums) or ``site`` (the mean of the
        sites' clipped updates, client-level DP's noise in shares).
    neighbours : int
        SecAgg+'s neighbours per site (0: every site, SecAgg's complete graph).
    """

    def __init__(
        self,
        inner,
        *,
        grid_spec: IntegerGrid,
        threshold: int,
        sample_rate: float,
        share_variance: float,
        step: ServerStep,
        level: str = "patient",
        neighbours: int = 0,
        **budget_kwargs,
    ) -> None:
        super().__init__(inner, **budget_kwargs)
        self.neighbours = neighbours
        self.grid_spec, self.threshold, self.sample_rate, self.step = grid_spec, threshold, sample_rate, step
        self.share_variance, self.level = share_variance, level
        self._grid: Grid | None = None
        self._instructions: dict[int, tuple[ArrayRecord, ConfigRecord]] = {}
        self._arrays: ArrayRecord | None = None

    def server_state(self) -> dict:
        """The server optimizer's moments, checkpointed with the global model (post-processing: no privacy cost)."""
        return {"server_step": self.step.state_dict()}

    def _configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        """Charge and select as the budget strategy does; keep the messages' contents as the secure
        sum's instructions and send nothing plain (the secure sum sends them in its stage 2)."""
        messages = list(super()._configure_train(server_round, arrays, config, grid))
        self._grid, self._arrays = grid, arrays
        self._instructions = {m.metadata.dst_node_id: (m.content["arrays"], m.content["config"]) for m in messages}
        crash_point("sent", self.round_offset + server_round)
        return []

    def _aggregate_train(self, server_round: int, replies) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_ = self.round_offset + server_round
        if not self._instructions:
            return None, None
        node_site = {node: site for site, node in self._selected.items()}

        def record(in_sum: tuple[int, ...]) -> None:  # write-ahead: before the server can unmask the sum
            self.store.record_secure_sum(
                round_, attempt=self._attempt, shares={node_site[n]: self.share_variance for n in in_sum}
            )

        try:
            summed = secure_sum(
                self._grid,
                instructions=self._instructions,
                bits=self.grid_spec.bits,
                threshold=min(self.threshold, len(self._instructions)),
                neighbours=self.neighbours if self.neighbours < len(self._instructions) else 0,
                round_=round_,
                before_unmask=record,
            )
        except SecureSumFailed as exc:  # nothing was decoded; every charge stays, and the round fails
            crash_point("replied", round_)
            outcomes = {site: _lost(exc.errors.get(node), default=str(exc)) for node, site in sorted(node_site.items())}
            return self._conclude(round_, outcomes, lambda: (None, None))
        crash_point("replied", round_)
        outcomes: dict[str, _Outcome] = {}
        declared: dict[str, float] = {}
        for node, site in node_site.items():
            if node not in summed.in_sum:
                outcomes[site] = _lost(
                    summed.errors.get(node), default="not in the secure sum: lost before sending its masked vector"
                )
                continue
            report = summed.reports.get(node, {})
            try:
                reported = events_from_wire(json.loads(str(report[EVENTS_KEY])))
                declared[site] = float(report[UNITS_KEY])
            except (KeyError, ValueError, TypeError) as exc:
                outcomes[site] = _Outcome(Status.FAILED, f"unreadable report beside its masked vector: {exc}")
                continue
            outcomes[site] = _Outcome(Status.CONFIRMED, reported=reported)

        def step() -> tuple[ArrayRecord, MetricRecord]:
            total = self.grid_spec.to_float(torch.as_tensor(summed.total))
            if self.level == "site":  # the mean of the sites' clipped updates; the number summed is public
                divisor = float(len(summed.in_sum))
                new = self.step.apply_update(self._arrays, total / divisor)
            else:  # one DP-SGD step: the public expected number of sampled units
                divisor = self.sample_rate * sum(declared.values())
                new = self.step(self._arrays, total / max(divisor, 1e-12))
            return new, MetricRecord({"sites-in-sum": len(summed.in_sum), "divisor": divisor})

        return self._conclude(round_, outcomes, step)


def _lost(error: str | None, *, default: str) -> _Outcome:
    """A site whose masked vector is not in the sum: refused (its policy named a rule), failed (it
    answered with an error), or lost (``default`` says how)."""
    if error is None:
        return _Outcome(Status.FAILED, default)
    return _Outcome(Status.REFUSED if REFUSAL in error else Status.FAILED, error)


def distributed_report(
    sums: list[dict[str, float]],
    *,
    event: DpEvent,
    colluders: int,
    threshold: int,
    delta: float,
    level: str = "patient",
) -> dict[str, object]:
    """The epsilon each adversary faces over every recorded secure sum (``fedclip.distributed.adversaries``):
    one Skellam event per sum with the variance that adversary cannot subtract; a variance of 0 is infinite."""
    out: dict[str, object] = {
        "sums": len(sums),
        "colluders": colluders,
        "threshold": threshold,
        "level": level,
        "delta": delta,
        "epsilon": {},
    }
    for adversary in ADVERSARIES:
        variances = [adversary_variances(s, colluders=colluders)[adversary] for s in sums if s]
        if any(v <= 0 for v in variances):
            eps = math.inf
        else:
            eps = epsilon(
                [
                    SkellamSumEvent(variance=v, l1=event.grid_l1, l2=event.grid_l2, sample_rate=event.sample_rate)
                    for v in variances
                ],
                delta=delta,
            )
        out["epsilon"][adversary] = eps if math.isfinite(eps) else "inf"
    return out
