"""The settings a comparison can run, each a set of hospital_clip run-config overrides.

Every setting shares the base config (data, model, warm start, rounds, local steps), so only where
the data is trained and how it is protected changes. Private settings train with the app's DP
defaults (trainable parameters, sample rate, learning rate); the non-private baselines train
with their own (``nonprivate.toml``: what serves a non-private run), so the gap DP leaves is
measured against a tuned baseline, not a handicapped one. ``unit`` says what the setting's
epsilon is about; non-private settings have none. ``relation`` is a label for the table: for local
DP the results read the relation each run's accountant actually used from its ``rounds.csv``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from simulations.hospital_clip.config import DEFAULT_TOML, SimulationConfig, load_toml

NONPRIVATE_TOML = DEFAULT_TOML.with_name("nonprivate.toml")
# the training keys of the non-private baseline (its file also names an output folder and a budget);
# a comparison's [base] that sets one of them sets it for every run
NONPRIVATE_TRAINING_KEYS = ("trainable", "sample-rate", "lr", "optimizer")


def nonprivate_training() -> dict[str, Any]:
    return {k: v for k, v in load_toml(NONPRIVATE_TOML).items() if k in NONPRIVATE_TRAINING_KEYS}


@dataclass(frozen=True)
class Setting:
    name: str
    description: str
    unit: str
    relation: str
    private: bool
    overrides: Callable[[float, SimulationConfig], dict[str, Any]]


def _local(
    unit: str, *, pooled: bool = False, client: bool = False, mode: str = "microbatch"
) -> Callable[[float, SimulationConfig], dict[str, Any]]:
    def build(eps: float, base: SimulationConfig) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dp-mode": mode,
            "privacy-unit": unit,
            "target-epsilon": eps,
            "budget": math.inf,
            "pool-sites": pooled,
            "client-dp-epsilon": eps if client else 0.0,
        }
        if pooled and base.declared_units:  # the pooled site declares every site's units
            out["declared-units"] = base.declared_units * base.num_sites
        return out

    return build


def _distributed() -> Callable[[float, SimulationConfig], dict[str, Any]]:
    """One DP-SGD step per round over all sites, the noise summed by secure aggregation: the base's
    rounds x local steps become rounds of one step, evaluated as often as the base evaluates. The
    white-box gradient canaries need local training and are left out (the data canaries stay)."""

    def build(eps: float, base: SimulationConfig) -> dict[str, Any]:
        return {
            **_local("identity")(eps, base),
            "dp-mode": "distributed",
            "local-steps": 1,
            "microbatch-size": 1,  # every unit its own clipped term (add-or-remove)
            "num-rounds": base.num_rounds * base.local_steps,
            "evaluate-every": base.local_steps * base.evaluate_every,
            "gradient-canaries": 0,
        }

    return build


def _secure_client() -> Callable[[float, SimulationConfig], dict[str, Any]]:
    """fed-client's guarantee without clean updates at the server: each site clips its update and adds
    its share of the client-level noise; SecAgg+ sums them (docs/privacy.md, "Distributed DP")."""

    def build(eps: float, base: SimulationConfig) -> dict[str, Any]:
        return {**_nonprivate(client=True)(eps, base), "secure-agg": True}

    return build


def _nonprivate(*, pooled: bool = False, client: bool = False) -> Callable[[float, SimulationConfig], dict[str, Any]]:
    """No local DP. Without client-level DP this is the baseline, trained as ``nonprivate.toml``
    trains; with it, sites keep the DP defaults (few trainable parameters: the server's noise
    lands on every trainable coordinate of the average)."""

    def build(eps: float, base: SimulationConfig) -> dict[str, Any]:
        out = {
            "dp-mode": "nonprivate",
            "privacy-unit": "record",
            "target-epsilon": 0.0,
            "budget": math.inf,
            "pool-sites": pooled,
            "client-dp-epsilon": eps if client else 0.0,
        }
        return out if client else {**out, **nonprivate_training()}

    return build


def _input(mode: str) -> Callable[[float, SimulationConfig], dict[str, Any]]:
    """Each site privatizes its images once (``mode``), then trains on them as the non-private
    baseline trains: the privatized images are all it has, and training them is post-processing."""

    def build(eps: float, base: SimulationConfig) -> dict[str, Any]:
        return {
            "dp-mode": mode,
            "privacy-unit": "identity",
            "target-epsilon": eps,
            "budget": math.inf,
            "pool-sites": False,
            "client-dp-epsilon": 0.0,
            **nonprivate_training(),
        }

    return build


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("pooled-nonprivate", "all sites' data pooled, no DP", "none", "-", False, _nonprivate(pooled=True)),
        Setting(
            "pooled-dp",
            "pooled data, central per-micro-batch DP (identity units)",
            "identity",
            "per micro-batch",
            True,
            _local("identity", pooled=True),
        ),
        Setting("fed-nonprivate", "federated, no DP", "none", "-", False, _nonprivate()),
        Setting(
            "fed-distributed",
            "federated DP-SGD, each site's noise share summed by secure aggregation (SecAgg+), identity units",
            "identity",
            "add_or_remove",
            True,
            _distributed(),
        ),
        Setting(
            "fed-local-record",
            "federated, local per-batch DP at every site, record units",
            "record",
            "per micro-batch",
            True,
            _local("record"),
        ),
        Setting(
            "fed-local-identity",
            "federated, local per-micro-batch DP at every site, identity units",
            "identity",
            "per micro-batch",
            True,
            _local("identity"),
        ),
        Setting(
            "fed-local-unit",
            "federated, local per-unit DP against public negatives, identity units",
            "identity",
            "add_or_remove",
            True,
            _local("identity", mode="unit"),
        ),
        Setting(
            "fed-client",
            "federated, client-level DP at the server (a site is the unit)",
            "site",
            "zero-out",
            True,
            _nonprivate(client=True),
        ),
        Setting(
            "fed-distributed-client",
            "federated, client-level DP with the noise added in shares by the sites and summed by SecAgg+ (a site is the unit)",
            "site",
            "zero-out",
            True,
            _secure_client(),
        ),
        Setting(
            "fed-local-client",
            "local identity-level DP plus client-level DP at the server",
            "identity + site",
            "per micro-batch + zero-out",
            True,
            _local("identity", client=True),
        ),
        # input-level privatization (needs masks for the mask settings: [base] identity-region < 1)
        Setting(
            "fed-cadp",
            "federated, every site's images privatized once by CADP (images only, not reports)",
            "identity (images)",
            "replace-one (local)",
            True,
            _input("cadp"),
        ),
        Setting(
            "fed-maskdp",
            "federated, every site's images noised inside the identity mask once (MaskDP)",
            "identity (masked region)",
            "replace-one (local)",
            True,
            _input("maskdp"),
        ),
        Setting(
            "fed-mask-replace",
            "federated, a public stand-in inside every identity mask (anonymization, no epsilon)",
            "none",
            "-",
            False,
            _input("mask-replace"),
        ),
    )
}
# the input-level settings are opt-in: they need their own data ([base] identity-region < 1 for the
# masks) and a fitted INN, so a grid that names no settings runs the gradient-DP ones
INPUT_SETTINGS = ("fed-cadp", "fed-maskdp", "fed-mask-replace")
MASK_SETTINGS = ("fed-maskdp", "fed-mask-replace")
# the secure-aggregation settings are opt-in too (default.toml names fed-distributed): one secure sum per
# DP-SGD step makes them the slowest to run, and a grid that names no settings should stay quick
SECURE_SETTINGS = ("fed-distributed", "fed-distributed-client")
DEFAULT_SETTINGS = tuple(name for name in SETTINGS if name not in INPUT_SETTINGS + SECURE_SETTINGS)
