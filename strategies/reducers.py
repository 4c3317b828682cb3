"""Fold a round's train replies into the aggregate one at a time, so the server need not hold them all.

Why: Flower's ``Strategy.start`` hands ``aggregate_train`` every reply of a round, and an inner
strategy such as ``FedAvg`` reads them as one list. With 1,000 sites that is 1,000 updates in the
server's memory at once (and, while the next round's replies arrive, the previous round's list is
still referenced by ``start``): the driver's memory grows with the number of sites. A weighted mean
does not need the list: ``RunningMean`` adds each reply's arrays, times its weight, to a float64
sum as the reply arrives, keeps only its small metric record, and divides at the end. Only the
aggregate is tentative: ``PrivacyBudgetStrategy`` asks for ``result()`` after it has settled every
charge and checked its failure quorum, and a failed quorum simply drops the reducer.

``reducer_for`` picks ``RunningMean`` for a plain ``FedAvg`` (exactly that class: subclasses and
other strategies may aggregate differently) and ``KeepReplies`` (the list, then the inner
strategy's own ``aggregate_train``) for everything else, e.g. a median or Flower's DP wrappers.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg, Strategy


class ReplyReducer(Protocol):
    def add(self, reply: Message) -> None: ...

    def result(self) -> tuple[ArrayRecord | None, MetricRecord | None]: ...


class KeepReplies:
    """Any inner strategy: keep the replies, aggregate them with the strategy's own ``aggregate_train``."""

    def __init__(self, strategy: Strategy, server_round: int) -> None:
        self._strategy, self._round = strategy, server_round
        self._replies: list[Message] = []

    def add(self, reply: Message) -> None:
        self._replies.append(reply)

    def result(self) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self._strategy.aggregate_train(self._round, self._replies)


class RunningMean:
    """FedAvg's weighted mean of the replies' arrays, summed as they arrive (float64, cast back to
    each array's dtype at the end), and FedAvg's own metric aggregation over their metric records.
    Replies are checked as FedAvg checks them: one ArrayRecord and one MetricRecord each, the same
    keys in all, the weight key present. A reply that fails is raised from ``result()``, where
    FedAvg raises it, so that the budget strategy has settled every charge first."""

    def __init__(self, strategy: FedAvg) -> None:
        self._key = strategy.weighted_by_key
        self._metrics_fn = strategy.train_metrics_aggr_fn
        self._sums: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self._total = 0.0
        self._metrics: list[RecordDict] = []  # one small MetricRecord per reply, for the metrics function
        self._array_keys: tuple[str, set[str]] | None = None
        self._metric_keys: set[str] | None = None
        self._error: InconsistentMessageReplies | None = None

    def add(self, reply: Message) -> None:
        if self._error is None:
            try:
                self._add(reply)
            except InconsistentMessageReplies as exc:
                self._error = exc

    def _add(self, reply: Message) -> None:
        content = reply.content
        if len(content.array_records) != 1 or len(content.metric_records) != 1:
            raise InconsistentMessageReplies(
                reason="Expected exactly one ArrayRecord and one MetricRecord in every reply "
                f"(node {reply.metadata.src_node_id}). Skipping aggregation."
            )
        name, arrays = next(iter(content.array_records.items()))
        metrics_name, metrics = next(iter(content.metric_records.items()))
        self._check_keys(name, set(arrays.keys()), set(metrics.keys()), reply.metadata.src_node_id)
        weight = float(metrics[self._key])
        for key, value in arrays.items():
            data = value.numpy()
            if key not in self._sums:
                self._sums[key] = np.zeros(data.shape, dtype=np.float64)
                self._dtypes[key] = data.dtype
            self._sums[key] += data.astype(np.float64) * weight
        self._total += weight
        self._metrics.append(RecordDict({metrics_name: metrics}))

    def _check_keys(self, name: str, array_keys: set[str], metric_keys: set[str], node: int) -> None:
        if self._array_keys is None:
            if self._key not in metric_keys:
                raise InconsistentMessageReplies(
                    reason=f"The MetricRecord of node {node} has no weight key {self._key!r}."
                )
            self._array_keys, self._metric_keys = (name, array_keys), metric_keys
        elif (name, array_keys) != self._array_keys or metric_keys != self._metric_keys:
            raise InconsistentMessageReplies(
                reason=f"The reply of node {node} has other ArrayRecord or MetricRecord keys "
                "than the first reply. Skipping aggregation."
            )

    def result(self) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._error is not None:
            raise self._error
        if not self._metrics:
            return None, None
        arrays = ArrayRecord(
            {k: Array(np.asarray(s / self._total, dtype=self._dtypes[k])) for k, s in self._sums.items()}
        )
        return arrays, self._metrics_fn(self._metrics, self._key)


def reducer_for(strategy: Strategy, server_round: int) -> ReplyReducer:
    """A running mean for a plain FedAvg; the kept list and the strategy's own aggregation otherwise."""
    if type(strategy) is FedAvg:
        return RunningMean(strategy)
    return KeepReplies(strategy, server_round)
