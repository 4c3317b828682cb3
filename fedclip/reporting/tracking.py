"""Experiment tracking: a run's config, per-round metrics and plots where researchers look.

Two backends, through their own libraries as their users call them:

* ``tensorboard``: event files under ``<run folder>/tensorboard`` (torch's ``SummaryWriter``), so
  ``tensorboard --logdir runs/`` shows every run below ``runs/``, a comparison's runs side by side
  (named by their folders: ``fed-local-identity/eps=4/seed=0``);
* ``mlflow``: a run in an MLflow experiment on a local file store (no server): every run-config
  key a parameter, every metric a history over rounds, the plots as artifacts. A comparison or a
  search is one experiment; ``mlflow ui --backend-store-uri <store>`` opens it.

Tracking is a view: the CSV files stay the record (a resumed run truncates them; TensorBoard keeps
the older points of a re-run round, and shows the newest). A resumed run continues its MLflow run
(its id is kept in the run's state folder). A tracking failure is reported once and then tracking
stops; it never stops a run.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

BACKENDS = ("tensorboard", "mlflow")


def parse_backends(text: str) -> tuple[str, ...]:
    """``"tensorboard,mlflow"`` -> the backends; ``""`` or ``"none"``: no tracking."""
    names = tuple(s.strip() for s in text.split(",") if s.strip() and s.strip() != "none")
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown:
        raise ValueError(f"tracking: unknown backend(s) {unknown}; expected a comma list of {list(BACKENDS)} or none")
    if "mlflow" in names:
        try:
            import mlflow  # noqa: F401
        except ImportError as exc:
            raise ValueError("tracking: mlflow is not installed; pip install 'fedclip[tracking]'") from exc
    return names


def prepare_store(uri: str, experiment: str) -> None:
    """Create the MLflow store and experiment once, before runs in parallel write to them (two
    processes creating a new SQLite store's tables at once would race)."""
    from mlflow.tracking import MlflowClient

    experiment_id(MlflowClient(tracking_uri=uri), uri, experiment)


def experiment_id(client, uri: str, experiment: str) -> str:
    """The experiment's id, created if new with its artifacts beside a SQLite store
    (``<store's folder>/mlartifacts``): MLflow's default, ``./mlruns``, is relative to whatever
    folder the process started in, so ``mlflow ui`` elsewhere would not find the plots."""
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return client.create_experiment(experiment, artifact_location=location)


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of ``metrics`` (empty cells, text and NaN are left out)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class Tracker:
    """One run's tracking, to every backend named; each call is guarded (see module doc)."""

    def __init__(
        self,
        *,
        backends: Sequence[str],
        run_dir: str | Path,
        experiment: str,
        run_name: str,
        mlflow_uri: str,
        resume: bool,
    ) -> None:
        self.run_dir = Path(run_dir)
        self._writers: dict[str, Any] = {}
        self._failed = False
        for name in backends:
            self._guard(name, lambda n=name: self._open(n, experiment, run_name, mlflow_uri, resume))

    def _open(self, name: str, experiment: str, run_name: str, mlflow_uri: str, resume: bool) -> None:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._writers[name] = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        else:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=mlflow_uri)
            experiment_key = experiment_id(client, mlflow_uri, experiment)
            id_file = self.run_dir / "state" / "mlflow_run_id"
            run_id = id_file.read_text().strip() if resume and id_file.is_file() else ""
            if not run_id:
                run_id = client.create_run(experiment_key, run_name=run_name).info.run_id
                id_file.parent.mkdir(parents=True, exist_ok=True)
                id_file.write_text(run_id + "\n")
            self._writers[name] = (client, run_id)

    def _guard(self, name: str, call) -> None:
        if self._failed:
            return
        try:
            call()
        except Exception as exc:  # a view must never stop the run
            self._failed = True
            print(
                f"tracking ({name}) failed and is off for the rest of the run: {type(exc).__name__}: {exc}",
                file=sys.stderr,
                flush=True,
            )

    def log_config(self, config: Mapping[str, Any]) -> None:
        text = json.dumps(dict(config), indent=2, sort_keys=True, default=str)
        for name, writer in self._writers.items():
            if name == "tensorboard":
                self._guard(name, lambda w=writer: w.add_text("config", f"```\n{text}\n```", 0))
            else:
                client, run_id = writer
                from mlflow.entities import Param

                params = [Param(str(k), str(v)[:6000]) for k, v in sorted(config.items())]
                self._guard(name, lambda: _log_params_once(client, run_id, params))

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        values = numeric(metrics)
        if not values:
            return
        for name, writer in self._writers.items():
            if name == "tensorboard":
                self._guard(name, lambda w=writer: _add_scalars(w, values, step))
            else:
                client, run_id = writer
                from mlflow.entities import Metric

                now = _now_ms()
                batch = [Metric(_mlflow_key(k), v, now, step) for k, v in values.items()]
                self._guard(name, lambda: client.log_batch(run_id, metrics=batch))

    def log_images(self, paths: Sequence[Path], *, step: int) -> None:
        """The run's plots: images in TensorBoard, artifacts in MLflow."""
        paths = [p for p in paths if Path(p).is_file()]
        for name, writer in self._writers.items():
            if name == "tensorboard":
                self._guard(name, lambda w=writer: _add_images(w, paths, step))
            else:
                client, run_id = writer
                self._guard(name, lambda: [client.log_artifact(run_id, str(p), "plots") for p in paths])

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """A run that raises ends its MLflow run as FAILED (KILLED if interrupted), never left 'running';
        a tracker closed already inside the block keeps the status it was closed with."""
        if exc_type is None:
            status = "FINISHED"
        else:
            status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        self.close(status=status)

    def close(self, *, status: str = "FINISHED") -> None:
        for name, writer in self._writers.items():
            if name == "tensorboard":
                self._guard(name, writer.close)
            else:
                client, run_id = writer
                self._guard(name, lambda: client.set_terminated(run_id, status=status))
        self._writers = {}


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def _mlflow_key(key: str) -> str:
    """MLflow's metric names allow letters, digits and ``_-. /``; others become ``_``."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in key)


def _log_params_once(client, run_id: str, params) -> None:
    """A resumed run has its parameters already (MLflow refuses to change a logged value)."""
    have = client.get_run(run_id).data.params
    new = [p for p in params if p.key not in have]
    for start in range(0, len(new), 100):  # MLflow's batch limit
        client.log_batch(run_id, params=new[start : start + 100])


def _add_scalars(writer, values: Mapping[str, float], step: int) -> None:
    for key, value in values.items():
        writer.add_scalar(key, value, step)
    writer.flush()


def _add_images(writer, paths: Sequence[Path], step: int) -> None:
    import numpy as np
    from PIL import Image

    for path in paths:
        image = np.asarray(Image.open(path).convert("RGB"))
        writer.add_image(f"plots/{Path(path).stem}", image, step, dataformats="HWC")
    writer.flush()
