"""Inner strategies by name: the budget wrapper composes with any of them."""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Strategy


def _fedavg() -> Strategy:
    return FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)


def _fedmedian() -> Strategy:
    return FedMedian(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)


def _fedtrimmedavg() -> Strategy:
    return FedTrimmedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1, beta=0.2)


INNER_STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "fedavg": _fedavg,
    "fedmedian": _fedmedian,
    "fedtrimmedavg": _fedtrimmedavg,
}


def make_inner_strategy(name: str) -> Strategy:
    try:
        return INNER_STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"strategy: unknown inner strategy {name!r}; expected one of {sorted(INNER_STRATEGIES)}") from None
