"""``fedclip tune``: a private hyperparameter search, step by step.

1. **Plan.** Every point of the space is a candidate's hyperparameters; each candidate trains with
   one noise multiplier, calibrated so that the whole search (repeat-and-select over the number of
   candidates, ``fedclip.privacy.selection``) costs ``target-epsilon`` at every site. A site whose
   budget or policy is below that refuses the search, by name, before anything runs.
2. **Draw and charge, write-ahead.** K (the number of candidates) and each candidate's point are
   drawn from the operating system's randomness and written, with every site's search event, to
   ``state/search.json`` (atomically) before the first candidate starts. A resumed search reads
   that file: nothing is drawn again, nothing is charged twice.
3. **Run** the candidates, each a full federated DP run of ``simulations.hospital_clip`` in its own
   folder, resumed from its last round if it was interrupted.
4. **Select** the best zero-shot accuracy on the server's validation patients (held-out patients no
   site holds: a score of the released model, free), or (``site-loss``) the lowest of the sites'
   released, noised loss (charged in every round's events, so in the search's); report the test
   accuracy on the other held-out patients, and each site's epsilon per adversary.

Only the selected model, its hyperparameters and its score may be published under the search's
epsilon: K, the other candidates and their scores (``candidates.csv``) are the operator's.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedclip.privacy.accountant import epsilon as composed_epsilon
from fedclip.privacy.events import DpEvent
from fedclip.privacy.ledger_store import LedgerStore
from fedclip.privacy.policy import load_policy_file
from fedclip.privacy.selection import SelectionEvent, calibrate_selection_noise
from fedclip.progress import progress_bar
from simulations.hospital_clip.config import SimulationConfig
from simulations.hospital_clip.preflight import data_shape
from simulations.launch import execute, is_done, prepare_tracking, tracking_overrides
from simulations.tune.config import TuneConfig
from strategies.faults import crash_point

SEARCH_FILE = "search.json"
NOT_PUBLISHABLE = (
    "the operator's record: publishing K, these candidates or their scores voids the released model's epsilon "
    "(only the selected model, its hyperparameters and its score are covered)"
)


@dataclass(frozen=True)
class Candidate:
    index: int
    point: dict[str, Any]
    folder: Path
    overrides: dict[str, Any]

    @property
    def label(self) -> str:
        return f"candidate {self.index} ({', '.join(f'{k}={v}' for k, v in self.point.items())})"


def candidate_events(cfg: SimulationConfig, sigma: float) -> tuple[DpEvent, ...]:
    """One candidate's events over all its rounds at noise ``sigma``, as its sites will be charged them."""
    return tuple(replace(e, steps=e.steps * cfg.num_rounds) for e in cfg.round_plan(sigma).events())


def _point_configs(config: TuneConfig) -> list[SimulationConfig]:
    """Every point's run config, parsed once (the noise is set per event by ``round_plan``)."""
    return [config.candidate_config(p, noise_multiplier=1.0) for p in config.points()]


def _distinct_events(configs: list[SimulationConfig], sigma: float) -> tuple[tuple[DpEvent, ...], ...]:
    return tuple(dict.fromkeys(candidate_events(cfg, sigma) for cfg in configs))


def plan(config: TuneConfig) -> tuple[float, SelectionEvent]:
    """The candidates' shared noise multiplier (the search costs at most target-epsilon) and the
    search's event at that noise, from the points' run configs parsed once."""
    configs = _point_configs(config)
    sigma = calibrate_selection_noise(
        target_epsilon=config.target_epsilon,
        delta=config.base_config().delta,
        repetitions=config.repetitions,
        candidates=lambda s: _distinct_events(configs, s),
    )
    return sigma, SelectionEvent(_distinct_events(configs, sigma), config.repetitions)


def search_event(config: TuneConfig, sigma: float) -> SelectionEvent:
    """The search's event at a given noise (the one ``plan`` charges, at its sigma)."""
    return SelectionEvent(_distinct_events(_point_configs(config), sigma), config.repetitions)


def check_budgets(config: TuneConfig, event: SelectionEvent) -> dict[str, float]:
    """Each site's epsilon for the search; refuse if it passes a site's budget or policy."""
    base = config.base_config()
    spent = event.epsilon(delta=base.delta)
    policies = load_policy_file(base.site_policy_file, delta=base.delta) if base.site_policy_file else {}
    out = {}
    for site in data_shape(base).units:
        if spent > base.budget_of(site):
            raise ValueError(
                f"tune: the search costs epsilon {spent:.3f} at {site} (delta {base.delta:g}), above its budget "
                f"{base.budget_of(site):g} (budget / site-budgets); lower tune.target-epsilon or raise the budget"
            )
        policy = policies.get(site, policies.get("*"))
        if policy is not None:
            at_policy = event.epsilon(delta=policy.delta)
            for rule, limit in (
                ("max-epsilon-run", policy.max_epsilon_run),
                ("max-epsilon-total", policy.max_epsilon_total),
            ):
                if at_policy > limit:
                    raise ValueError(
                        f"tune: {site}'s policy refuses the search: {rule}: it would cost epsilon {at_policy:.3f} "
                        f"(delta {policy.delta:g}), above the limit {limit:g}"
                    )
        out[site] = spent
    return out


def _write_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def draw_and_charge(config: TuneConfig, *, progress=print) -> dict:
    """The search's state: read back if it exists (a resume), else drawn and written before anything runs."""
    state = Path(config.output_dir) / "state"
    path = state / SEARCH_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["config"] != _fingerprint(config):
            raise ValueError(
                f"{path}: this folder holds a search with another configuration; resume it with the same config "
                "or choose another output-dir (a search is charged once, with what it was planned as)"
            )
        progress(f"tune: resuming the search in {config.output_dir} (K = {saved['k']}, charged already)")
        return saved
    sigma, event = plan(config)
    epsilons = check_budgets(config, event)
    rng = np.random.default_rng(secrets.randbits(128))  # the OS's randomness: K must stay secret and unchosen
    k = config.repetitions.draw(rng)
    points = config.points()
    chosen = [points[int(i)] for i in rng.integers(len(points), size=k)]
    base = config.base_config()
    saved = {
        "config": _fingerprint(config),
        "k": k,
        "noise_multiplier": sigma,
        "candidates": [{"index": i, "point": p} for i, p in enumerate(chosen)],
        "charges": {
            site: {"event": event.to_json(), "epsilon": eps, "delta": base.delta, "accountant": "rdp"}
            for site, eps in epsilons.items()
        },
    }
    state.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, saved)
    progress(
        f"tune: charged every site epsilon {max(epsilons.values()):.3f} (delta {base.delta:g}) for the whole search "
        f"before it runs; candidates train at noise multiplier {sigma:.3f}"
    )
    return saved


def _fingerprint(config: TuneConfig) -> dict:
    return {
        "target_epsilon": config.target_epsilon,
        "repetitions": config.repetitions.to_dict(),
        "space": {k: list(v) for k, v in sorted(config.space.items())},
        "base": config.base,
        "selection": config.selection,
        "validation_patients": config.validation_patients,
    }


def candidates(config: TuneConfig, saved: dict) -> list[Candidate]:
    out = Path(config.output_dir)
    runs = []
    for row in saved["candidates"]:
        folder = out / "candidates" / str(row["index"])
        overrides = {
            **config.base,
            **row["point"],
            "validation-patients": config.validation_patients,
            "noise-multiplier": saved["noise_multiplier"],
            "target-epsilon": 0.0,
            "output-dir": str(folder),
            "cache-dir": str(config.base.get("cache-dir", out / "cache")),
            **tracking_overrides(config.base, out=out, experiment=f"tune {out}", label=f"candidate {row['index']}"),
        }
        runs.append(Candidate(row["index"], row["point"], folder, overrides))
    return runs


def run_search(config: TuneConfig, *, progress=print, workers: int = 1) -> Path:
    """Plan, charge, run and select; returns the output folder (``tune.md`` in it). ``workers``:
    how many runs share the machine (each candidate gets its share of the cores)."""
    saved = draw_and_charge(config, progress=progress)
    crash_point("search-charged", 0)
    runs = candidates(config, saved)
    if runs:
        prepare_tracking(config.base_config(), runs[0].overrides)
    bar = progress_bar(total=len(runs), desc="candidates", unit="run", leave=True)
    for run in runs:
        if not is_done(run):
            progress(f"tune: {run.label}")
            execute(run, workers=workers)
        bar.update(1)
    bar.close()
    return write_results(config, saved, runs)


def _final_row(run: Candidate) -> dict[str, float]:
    utility = pd.read_csv(run.folder / "utility.csv")
    last = utility.iloc[-1]
    rounds = pd.read_csv(run.folder / "rounds.csv")
    final = rounds[rounds["round"] == rounds["round"].max()]
    return {
        "validation_zero_shot_accuracy": float(last["validation_zero_shot_accuracy"]),
        "test_zero_shot_accuracy": float(last["zero_shot_accuracy"]),
        # the sites' released (noised, charged) loss in the last round; NaN unless release-loss-noise > 0
        "site_loss": float(pd.to_numeric(final["train_loss"], errors="coerce").mean()),
        "round": int(last["round"]),
    }


def select(rows: list[dict], *, selection: str) -> dict | None:
    """The released candidate: the best validation accuracy (public), or the lowest released loss (site-loss)."""
    if not rows:
        return None
    if selection == "site-loss":
        return min(rows, key=lambda row: row["site_loss"])
    return max(rows, key=lambda row: row["validation_zero_shot_accuracy"])


def server_epsilons(config: TuneConfig, runs: list[Candidate]) -> dict[str, float]:
    """What the server faces: every candidate's charged events composed, per site (it saw every reply)."""
    base = config.base_config()
    events: dict[str, list[DpEvent]] = {}
    for run in runs:
        path = run.folder / "state" / "ledger.sqlite"
        if not path.is_file():
            continue
        store = LedgerStore(path, delta=base.delta, accountant=base.accountant, create=False)
        for site in store.sites():
            events.setdefault(site, []).extend(store.events(site))
        store.close()
    return {site: composed_epsilon(ev, delta=base.delta, accountant=base.accountant) for site, ev in events.items()}


def _markdown(frame: pd.DataFrame) -> str:
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)])


def write_results(config: TuneConfig, saved: dict, runs: list[Candidate]) -> Path:
    out = Path(config.output_dir)
    rows = [{"candidate": r.index, **r.point, **_final_row(r), "folder": str(r.folder)} for r in runs]
    table = pd.DataFrame(rows)
    table.to_csv(out / "candidates.csv", index=False)
    best = select(rows, selection=config.selection)
    released = {site: c["epsilon"] for site, c in saved["charges"].items()}
    server = server_epsilons(config, runs)
    base = config.base_config()
    selected = {
        "selected": None if best is None else {k: v for k, v in best.items()},
        "noise_multiplier": saved["noise_multiplier"],
        "epsilon": {
            "released-model": released,
            "server": server,
        },
        "delta": base.delta,
        "repetitions": config.repetitions.to_dict(),
        "who": {
            "released-model": "anyone who sees only the selected model, its hyperparameters and its score "
            "(repeat-and-select, Papernot and Steinke 2022, RDP)",
            "server": "the server, which saw every candidate's replies: every candidate run composed "
            f"({base.accountant.upper()} accountant over the runs' ledgers)",
        },
    }
    (out / "selected.json").write_text(json.dumps(selected, indent=2, sort_keys=True))
    lines = [
        f"# Private hyperparameter search: {out}",
        "",
        f"Target: epsilon {config.target_epsilon:g} per site for the released model, the search included "
        f"(delta {base.delta:g}); number of candidates ~ {config.repetitions.distribution} "
        f"(mean {config.repetitions.mean:g}"
        + (f", shape {config.repetitions.shape:g}" if config.repetitions.distribution != "poisson" else "")
        + f"); every candidate at noise multiplier {saved['noise_multiplier']:.3f}.",
        "",
    ]
    if best is None:
        lines.append("No candidate was drawn (K = 0): nothing to release; the search's charge stands.")
    else:
        point = ", ".join(f"{k} = {best[k]}" for k in config.space)
        lines += [
            f"**Selected** by {config.selection}: {point} (candidate {best['candidate']}): validation zero-shot "
            f"{best['validation_zero_shot_accuracy']:.3f}, test zero-shot {best['test_zero_shot_accuracy']:.3f}"
            + (f", the sites' released loss {best['site_loss']:.3f}" if best["site_loss"] == best["site_loss"] else "")
            + "; "
            f"its run: `{best['folder']}`.",
        ]
    lines += ["", "| site | epsilon, released model (search included) | epsilon, server (every candidate's replies) |"]
    lines += ["|---|---|---|"]
    for site in sorted(released):
        lines.append(f"| {site} | {released[site]:.3f} | {server.get(site, 0.0):.3f} |")
    lines += ["", f"Candidates ({NOT_PUBLISHABLE}):", "", _markdown(table) if rows else "(none)"]
    (out / "tune.md").write_text("\n".join(lines) + "\n")
    return out
