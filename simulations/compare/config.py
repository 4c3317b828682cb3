"""The comparison's configuration: a TOML file with a [compare] table and a [base] run config."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulations.compare.settings import DEFAULT_SETTINGS, MASK_SETTINGS, SETTINGS
from simulations.hospital_clip.config import SimulationConfig
from simulations.toml_tables import read_tables

DEFAULT_COMPARE_TOML = Path(__file__).with_name("default.toml")


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    output_dir: str = "runs/compare"
    settings: tuple[str, ...] = DEFAULT_SETTINGS
    epsilons: tuple[float, ...] = (1.0, 8.0)
    seeds: tuple[int, ...] = (0, 1)
    parallel: int = 0  # 0: as many as the cores allow
    # an axis of trainable sets: every private setting runs once per set (labelled "setting@set");
    # empty: the base's (the app's DP default). Non-private baselines keep their own training keys.
    trainable: tuple[str, ...] = ()
    # runs.csv files of the same grid run elsewhere (another machine, an earlier session): their rows
    # join the tables; a run also finished here counts once, from here
    earlier_runs: tuple[str, ...] = ()
    base: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [s for s in self.settings if s not in SETTINGS]
        if unknown or not self.settings:
            raise ValueError(
                f"compare.settings: unknown {unknown or 'empty list'}; expected some of {sorted(SETTINGS)}"
            )
        if not self.epsilons or any(not (e > 0 and math.isfinite(e)) for e in self.epsilons):
            raise ValueError(f"compare.epsilons: expected finite values > 0, got {list(self.epsilons)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"compare.seeds: expected distinct integers, got {list(self.seeds)}")
        if self.parallel < 0:
            raise ValueError(f"compare.parallel: expected 0 (automatic) or >= 1, got {self.parallel}")
        if len(set(self.trainable)) != len(self.trainable):
            raise ValueError(f"compare.trainable: expected distinct trainable sets, got {list(self.trainable)}")
        if self.trainable and "trainable" in self.base:
            raise ValueError("base.trainable: the comparison's trainable axis sets it; remove one of the two")
        for key in ("output-dir", "seed", "resume"):
            if key in self.base:
                raise ValueError(f"base.{key}: set by the comparison itself; remove it from [base]")
        for path in self.earlier_runs:
            if not Path(path).is_file():
                raise ValueError(f"compare.earlier-runs: file not found: {path}")
        base = self.base_config()  # validates every base key now, before anything runs
        for value in self.trainable:  # each against the base's architecture, before anything runs
            SimulationConfig.from_run_config({**base.to_run_config(), "trainable": value})
        masked = [s for s in self.settings if s in MASK_SETTINGS]
        if masked and base.identity_region >= 1 and not base.manifest:
            raise ValueError(
                f"compare.settings: {masked} need a mask per image; set [base] identity-region below 1 "
                "(the generator then confines each look to a patch and writes its mask)"
            )

    def base_config(self) -> SimulationConfig:
        from simulations.hospital_clip.server_app import default_run_config

        return SimulationConfig.from_run_config({**default_run_config(), **self.base})

    def workers(self) -> int:
        """Runs at once: each run keeps about two cores busy (its Ray workers and the server)."""
        return self.parallel or max(1, (os.cpu_count() or 1) // 2)

    @classmethod
    def from_toml(cls, path: str | Path) -> "CompareConfig":
        known = {"output-dir", "settings", "epsilons", "seeds", "parallel", "trainable", "earlier-runs"}
        tables = read_tables(path, what="comparison config", tables={"compare": known, "base": None})
        table = tables["compare"]
        kwargs: dict[str, Any] = {"base": tables["base"]}
        if "output-dir" in table:
            kwargs["output_dir"] = str(table["output-dir"])
        for key in ("settings", "epsilons", "seeds", "trainable", "earlier-runs"):
            if key in table:
                if not isinstance(table[key], list):
                    raise ValueError(f"compare.{key}: expected a list, got {table[key]!r}")
                kwargs[key.replace("-", "_")] = tuple(float(v) if key == "epsilons" else v for v in table[key])
        if "parallel" in table:
            kwargs["parallel"] = int(table["parallel"])
        return cls(**kwargs)
