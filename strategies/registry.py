"""Inner strategies by name: the budget wrapper composes with any of them."""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Strategy

# Replies carry no example count (it differs between neighbouring data sets: not releasable without
# noise); sites are weighted by a public weight they declare before training.
SITE_WEIGHT_KEY = "site-weight"


def _shared(fraction_train: float) -> dict:
    """What every inner strategy is given: sample a share of the eligible sites, evaluate none on
    the sites (the server evaluates), weight sites by their declared public weight."""
    return dict(
        fraction_train=fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=1,
        weighted_by_key=SITE_WEIGHT_KEY,
    )


INNER_STRATEGIES: dict[str, Callable[[float], Strategy]] = {
    "fedavg": lambda fraction_train: FedAvg(**_shared(fraction_train)),
    "fedmedian": lambda fraction_train: FedMedian(**_shared(fraction_train)),
    "fedtrimmedavg": lambda fraction_train: FedTrimmedAvg(beta=0.2, **_shared(fraction_train)),
}


def make_inner_strategy(name: str, *, fraction_train: float = 1.0) -> Strategy:
    """``fraction_train``: the share of eligible sites the inner strategy samples each round."""
    try:
        return INNER_STRATEGIES[name](fraction_train)
    except KeyError:
        raise ValueError(
            f"strategy: unknown inner strategy {name!r}; expected one of {sorted(INNER_STRATEGIES)}"
        ) from None
