"""Launch one hospital_clip simulation as its own process, resumed if it was interrupted.

``fedclip compare`` and ``fedclip tune`` both run many federations; each is a ``flower-simulation``
process with its own Ray runtime, folder and log, marked done (``done.json``) when it finished, so
that a stopped batch resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fedclip.reporting.tracking import prepare_store

if TYPE_CHECKING:
    from simulations.hospital_clip.config import SimulationConfig


class Launchable(Protocol):
    """What a launcher needs of a run: its folder, its run-config overrides, a label for messages."""

    @property
    def folder(self) -> Path: ...

    @property
    def overrides(self) -> dict[str, Any]: ...

    @property
    def label(self) -> str: ...


def tracking_overrides(base: dict[str, Any], *, out: Path, experiment: str, label: str) -> dict[str, Any]:
    """A batch's runs as one MLflow experiment in one store beside them, each named by its label;
    what ``[base]`` sets itself wins."""
    defaults = {
        "mlflow-uri": f"sqlite:///{(out / 'mlflow.db').resolve()}",
        "experiment": experiment,
        "run-label": label,
    }
    return {k: v for k, v in defaults.items() if k not in base}


def prepare_tracking(config: "SimulationConfig", overrides: dict[str, Any]) -> None:
    """Create the batch's MLflow store and experiment before its runs start (see ``prepare_store``)."""
    if "mlflow" in config.tracking_backends():
        prepare_store(overrides.get("mlflow-uri", config.mlflow_uri), overrides.get("experiment", config.experiment))


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def is_done(run: Launchable) -> bool:
    return (run.folder / "done.json").is_file()


def thread_env(workers: int) -> dict[str, str]:
    """The environment of one run: its share of the cores for torch's thread pools. Two runs with
    two OpenMP threads each on two cores spin against each other (measured: a warm start that takes
    1.5 minutes alone did not finish in 16 with three runs at once). A value the user set wins."""
    share = str(max(1, (os.cpu_count() or 1) // max(1, workers)))
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(key, share)
    return env


def execute(run: Launchable, *, workers: int = 1) -> Launchable:
    """Run (or resume) one simulation; raise with the log's tail if it fails."""
    overrides = dict(run.overrides)
    if (run.folder / "state" / "global.pt").exists():
        overrides["resume"] = True
    config = " ".join(f"{k}={toml_value(v)}" for k, v in overrides.items())
    cmd = [sys.executable, "-m", "simulations.cli", "--app", "simulations.hospital_clip", "--run-config", config]
    run.folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with (run.folder / "log.txt").open("a") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=thread_env(workers))
    if done.returncode != 0:
        tail = (run.folder / "log.txt").read_text()[-2000:]
        raise RuntimeError(f"{run.label} failed (exit {done.returncode}); log {run.folder / 'log.txt'}:\n{tail}")
    (run.folder / "done.json").write_text(json.dumps({"seconds": time.time() - started, "label": run.label}))
    return run
