"""Run the comparison matrix: one hospital_clip run per (setting, epsilon, seed), reused if done.

Each run is a ``flower-simulation`` process with its own Ray runtime and its own folder
``<output>/<setting>/eps=<e>/seed=<s>/``. Runs that finished are read back, not repeated; a run
that was interrupted is resumed from its saved round. Independent runs go in parallel, as many
as ``CompareConfig.workers()`` allows (one after another on a small machine).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulations.compare.config import CompareConfig
from simulations.compare.settings import NONPRIVATE_TRAINING_KEYS, SETTINGS
from simulations.launch import execute, is_done, prepare_tracking, tracking_overrides


@dataclass(frozen=True)
class RunSpec:
    setting: str
    epsilon: float | None  # None for non-private settings
    seed: int
    folder: Path
    overrides: dict[str, Any]
    trainable: str = ""  # a value of the comparison's trainable axis ("" without one)

    @property
    def name(self) -> str:
        return run_name(self.setting, self.trainable)

    @property
    def label(self) -> str:
        return run_label(self.name, self.epsilon, self.seed)


def run_label(name: str, epsilon: float | None, seed: int) -> str:
    """How messages and MLflow name a run: ``fed-local-identity eps=4 seed=0``."""
    return f"{name} eps={'none' if epsilon is None else f'{epsilon:g}'} seed={seed}"


def run_name(setting: str, trainable: str) -> str:
    """The setting as the tables and folders name it: ``fed-local-identity@lora-8`` on a trainable axis."""
    return f"{setting}@{trainable}" if trainable else setting


def plan_runs(config: CompareConfig) -> list[RunSpec]:
    """Every run, seed by seed: a comparison stopped part-way has whole seeds of every setting."""
    base = config.base_config()
    out = Path(config.output_dir)
    # a training key set in [base] is shared by every run, the baselines too
    explicit = {k: v for k, v in config.base.items() if k in NONPRIVATE_TRAINING_KEYS}
    runs = []
    for seed in config.seeds:
        for name in config.settings:
            setting = SETTINGS[name]
            for trainable in (config.trainable or ("",)) if setting.private else ("",):
                for eps in config.epsilons if setting.private else (None,):
                    folder = (
                        out
                        / run_name(name, trainable)
                        / f"eps={'none' if eps is None else f'{eps:g}'}"
                        / f"seed={seed}"
                    )
                    overrides = {
                        **config.base,
                        **setting.overrides(eps or 0.0, base),
                        **explicit,
                        **({"trainable": trainable} if trainable else {}),
                        "seed": seed,
                        "output-dir": str(folder),
                        "cache-dir": str(out / "cache"),
                        **tracking_overrides(
                            config.base,
                            out=out,
                            experiment=f"compare {out}",
                            label=run_label(run_name(name, trainable), eps, seed),
                        ),
                    }
                    runs.append(RunSpec(name, eps, seed, folder, overrides, trainable))
    return runs


def finished_runs(config: CompareConfig, *, progress=print) -> list[RunSpec]:
    """The runs of the plan that have finished, for an interim report while others still run."""
    runs = plan_runs(config)
    done = [r for r in runs if is_done(r)]
    if not done:
        raise RuntimeError(f"no finished run under {config.output_dir} yet (0 of {len(runs)}); nothing to report")
    missing = sorted({f"seed={r.seed}" for r in runs if not is_done(r)})
    progress(
        f"compare --report: {len(done)} of {len(runs)} runs finished"
        + (f"; incomplete: {', '.join(missing)} (the table covers the finished runs only)" if missing else "")
    )
    return done


def run_all(config: CompareConfig, *, progress=print) -> list[RunSpec]:
    runs = plan_runs(config)
    todo = [r for r in runs if not is_done(r)]
    progress(
        f"compare: {len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to run, "
        f"{config.workers()} at a time"
    )
    if todo:
        prepare_tracking(config.base_config(), todo[0].overrides)
    failures = []
    with ThreadPoolExecutor(max_workers=config.workers()) as pool:
        futures = {pool.submit(execute, r, workers=config.workers()): r for r in todo}
        for i, future in enumerate(as_completed(futures), 1):
            run = futures[future]
            try:
                future.result()
                progress(f"  [{i}/{len(todo)}] done: {run.label}")
            except RuntimeError as exc:
                failures.append(str(exc))
                progress(f"  [{i}/{len(todo)}] FAILED: {run.label}")
    if failures:
        raise RuntimeError("some runs failed; finished runs are kept and will be reused:\n" + "\n".join(failures))
    return runs
