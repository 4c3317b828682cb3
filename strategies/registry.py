"""Inner strategies by name: the budget wrapper composes with any of them."""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Strategy

# Replies carry no example count (it differs between neighbouring data sets: not releasable without
# noise); sites are weighted by a public weight they declare before training.
SITE_WEIGHT_KEY = "site-weight"


def _fedavg(fraction_train: float) -> Strategy:
    return FedAvg(
        fraction_train=fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=1,
        weighted_by_key=SITE_WEIGHT_KEY,
    )


def _fedmedian(fraction_train: float) -> Strategy:
    return FedMedian(
        fraction_train=fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=1,
        weighted_by_key=SITE_WEIGHT_KEY,
    )


def _fedtrimmedavg(fraction_train: float) -> Strategy:
    return FedTrimmedAvg(
        fraction_train=fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=1,
        beta=0.2,
        weighted_by_key=SITE_WEIGHT_KEY,
    )


INNER_STRATEGIES: dict[str, Callable[[float], Strategy]] = {
    "fedavg": _fedavg,
    "fedmedian": _fedmedian,
    "fedtrimmedavg": _fedtrimmedavg,
}


def make_inner_strategy(name: str, *, fraction_train: float = 1.0) -> Strategy:
    """``fraction_train``: the share of eligible sites the inner strategy samples each round."""
    try:
        return INNER_STRATEGIES[name](fraction_train)
    except KeyError:
        raise ValueError(
            f"strategy: unknown inner strategy {name!r}; expected one of {sorted(INNER_STRATEGIES)}"
        ) from None
