"""The search's configuration: a TOML file with [tune], a [space] of hyperparameters, a [base] run config.

Every value is checked here, before anything runs: each point of the space is parsed as the run
config it becomes, and the search's epsilon is held against every site's budget and policy.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedclip.privacy.selection import DISTRIBUTIONS, Repetitions
from simulations.hospital_clip.config import SimulationConfig
from simulations.toml_tables import read_tables

DEFAULT_TUNE_TOML = Path(__file__).with_name("default.toml")
# what a search may vary: hyperparameters of the training, none of the data or the privacy unit
TUNABLE = ("lr", "max-grad-norm", "trainable", "local-steps", "sample-rate")
# public: zero-shot accuracy on the server's validation patients (its own data: free);
# site-loss: the sites' released contrastive loss (release-loss-noise > 0: noised, clipped, charged every round)
SELECTIONS = ("public", "site-loss")
# keys the search sets itself in every candidate's run config
SET_BY_SEARCH = ("output-dir", "resume", "noise-multiplier", "target-epsilon", "validation-patients")
GAUSSIAN_MODES = ("microbatch", "unit", "paper")


@dataclass(frozen=True, kw_only=True)
class TuneConfig:
    """Parameters
    ----------
    target_epsilon : float
        The released model's epsilon at every site, the whole search included (``delta`` of [base]).
    repetitions : Repetitions
        The distribution of the number of candidate runs (drawn from the OS, kept secret).
    space : dict[str, tuple]
        Each tunable key's values; a candidate draws one of each, uniformly and independently.
    selection : str
        ``public``: zero-shot accuracy on the server's validation patients (its own data: free);
        ``site-loss``: the lowest mean of the sites' released, noised training loss in the last
        round (``release-loss-noise`` > 0 in [base]: charged in every candidate's events).
    validation_patients : int
        Held-out patients set aside for the selection; the test accuracy is on the rest.
    """

    output_dir: str = "runs/tune"
    target_epsilon: float = 4.0
    repetitions: Repetitions = field(default_factory=lambda: Repetitions(distribution=DISTRIBUTIONS[0], mean=3.0))
    selection: str = "public"
    validation_patients: int = 125
    space: dict[str, tuple] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.target_epsilon > 0 and math.isfinite(self.target_epsilon)):
            raise ValueError(f"tune.target-epsilon: expected a finite epsilon > 0, got {self.target_epsilon}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"tune.selection: expected one of {list(SELECTIONS)}, got {self.selection!r}")
        if not self.space:
            raise ValueError(f"[space]: expected at least one of {list(TUNABLE)} with a list of values")
        for key, values in self.space.items():
            if key not in TUNABLE:
                raise ValueError(f"space.{key}: not a tunable key; expected some of {list(TUNABLE)}")
            if not values or len(set(values)) != len(values):
                raise ValueError(f"space.{key}: expected a non-empty list of distinct values, got {list(values)}")
        for key in SET_BY_SEARCH:
            if key in self.base:
                raise ValueError(f"base.{key}: set by the search itself; remove it from [base]")
        clash = sorted(set(self.space) & set(self.base))
        if clash:
            raise ValueError(f"base: {clash} are also in [space]; a key is searched or fixed, not both")
        base = self.base_config()
        if self.selection == "site-loss" and not base.release_loss_noise > 0:
            raise ValueError(
                "tune.selection: site-loss selects on the sites' released loss; set release-loss-noise > 0 in [base] "
                "(its noise is charged with every round)"
            )
        if base.dp_mode not in GAUSSIAN_MODES or base.microbatch_size != 1 or base.client_dp_epsilon > 0:
            raise ValueError(
                f"base: a search needs local Gaussian DP with add-or-remove events (dp-mode one of "
                f"{list(GAUSSIAN_MODES)}, microbatch-size 1, no client-dp-epsilon); got dp-mode {base.dp_mode!r}, "
                f"microbatch-size {base.microbatch_size}, client-dp-epsilon {base.client_dp_epsilon}"
            )
        if base.deployment:
            raise ValueError("base.sites: fedclip tune runs simulations; a deployment's search is not built")
        for point in self.points():  # every candidate's run config, parsed now
            self.candidate_config(point, noise_multiplier=1.0)

    def base_config(self) -> SimulationConfig:
        from simulations.hospital_clip.server_app import default_run_config

        return SimulationConfig.from_run_config(
            {**default_run_config(), **self.base, "validation-patients": self.validation_patients}
        )

    def points(self) -> list[dict[str, Any]]:
        """Every point of the space (the candidates draw among them)."""
        keys = sorted(self.space)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.space[k] for k in keys))]

    def candidate_config(self, point: dict[str, Any], *, noise_multiplier: float) -> SimulationConfig:
        from simulations.hospital_clip.server_app import default_run_config

        return SimulationConfig.from_run_config(
            {
                **default_run_config(),
                **self.base,
                **point,
                "validation-patients": self.validation_patients,
                "noise-multiplier": noise_multiplier,
                "target-epsilon": 0.0,
            }
        )

    @classmethod
    def from_toml(cls, path: str | Path) -> "TuneConfig":
        known = {"output-dir", "target-epsilon", "distribution", "mean", "shape", "selection", "validation-patients"}
        tables = read_tables(path, what="search config", tables={"tune": known, "space": None, "base": None})
        table = tables["tune"]
        space = {}
        for key, values in tables["space"].items():
            if not isinstance(values, list):
                raise ValueError(f"{path}: space.{key}: expected a list of values, got {values!r}")
            space[key] = tuple(values)
        try:
            repetitions = Repetitions(
                distribution=str(table.get("distribution", DISTRIBUTIONS[0])),
                mean=float(table.get("mean", 3.0)),
                shape=float(table.get("shape", 1.0)),
            )
        except ValueError as exc:
            raise ValueError(f"{path}: [tune] {exc}") from exc
        kwargs: dict[str, Any] = {"space": space, "base": tables["base"], "repetitions": repetitions}
        for key in ("output-dir", "selection"):
            if key in table:
                kwargs[key.replace("-", "_")] = str(table[key])
        if "target-epsilon" in table:
            kwargs["target_epsilon"] = float(table["target-epsilon"])
        if "validation-patients" in table:
            kwargs["validation_patients"] = int(table["validation-patients"])
        return cls(**kwargs)
