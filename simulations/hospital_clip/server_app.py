"""The federation's ServerApp: prepare data and warm start, discover sites, run the strategy.

Read top to bottom, ``run`` is the whole experiment: resolve the config, make (or find) the
data and the warm-started model, ask every SuperNode which site it is, plan each site's next
round, then let ``PrivacyBudgetStrategy`` wrapping the inner strategy run the rounds, with IDIA
and utility after each through ``evaluate_fn``. Tables, plots and ``summary.md`` land in the
output folder.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from scipy.stats import binom

from fedclip.attacks.base import Attack
from fedclip.attacks.canary import CanaryAudit
from fedclip.attacks.gradient_canaries import (
    GradientCanaryAudit,
    GradientCanaryReplies,
    canaries_to_wire,
    draw_dirac_canaries,
)
from fedclip.attacks.reference_cache import recipe_key
from fedclip.attacks.reference_cache import restore as restore_references
from fedclip.attacks.reference_cache import save as save_references
from fedclip.attacks.reference_models import reference_models
from fedclip.attacks.replies import ReplyAttack, ReplyObserver, observe_each, reply_rounds
from fedclip.attacks.suite import target_attacks
from fedclip.data.canaries import CANARY_FILE, load_canaries
from fedclip.data.manifest import load_manifest
from fedclip.data.schema import Split
from fedclip.data.synthetic import generate
from fedclip.data.tensors import load_pairs
from fedclip.distributed.adversaries import planned_share
from fedclip.distributed.grid import Grid as IntegerGrid
from fedclip.models.arrays import model_to_arrays
from fedclip.models.factory import ModelConfig, create_model
from fedclip.privacy.calibration import calibrate_noise_multiplier, calibrate_skellam_noise, warn_if_delta_is_large
from fedclip.privacy.events import PrivacyUnit
from fedclip.privacy.ledger_store import LedgerStore
from fedclip.privacy.modes import INPUT_MODES
from fedclip.privacy.policy import REFUSAL
from fedclip.privacy.randomness import NOT_PRIVATE_AGAINST_THE_SERVER
from fedclip.privacy.release import release_events
from fedclip.privatize.plan import InputPlan
from fedclip.reporting.console_table import run_table
from fedclip.reporting.plots import plot_run
from fedclip.reporting.run_files import RunFiles
from fedclip.reporting.summary import write_summary
from fedclip.reporting.tracking import Tracker
from fedclip.training.distributed import trainable_dim
from fedclip.training.warmstart import WarmStartConfig, warm_start
from simulations.hospital_clip.config import DEFAULT_TOML, SimulationConfig, load_toml
from simulations.hospital_clip.discovery import discover_sites
from simulations.hospital_clip.evaluator import RoundEvaluator
from simulations.hospital_clip.input_privacy import input_plan
from simulations.hospital_clip.plan import RoundPlan, SecureSumPlan, SharedFiles
from simulations.hospital_clip.preflight import data_shape, preflight
from simulations.hospital_clip.task import manifest_path, pick_device
from strategies.client_level import calibrate_site_noise, site_level_report, with_site_level_dp
from strategies.distributed import DistributedDpStrategy, ServerStep, distributed_report
from strategies.faults import REPORT_PHASE, crash_point
from strategies.privacy_budget import PrivacyBudgetStrategy, SiteFailure, SiteRound
from strategies.registry import make_inner_strategy
from strategies.secure_sum import max_bits
from strategies.windowed_grid import WindowedGrid

# run-config keys that are paths on the server's machine: never sent to a site
SERVER_PATHS = ("manifest", "pretrained", "output-dir", "cache-dir", "site-policy-file", "audit-manifest")
REFERENCE_SCORES = "lira_references.npz"  # the attacker's reference scores, read back on resuming


def default_run_config() -> dict[str, Any]:
    return load_toml(DEFAULT_TOML)


def resolve_config(*layers: Mapping[str, Any]) -> SimulationConfig:
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    return SimulationConfig.from_run_config(merged)


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose config is: defaults, then the run config Flower passes, then overrides."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = resolve_config(default_run_config(), context.run_config, overrides or {})
        run(grid, replace(cfg, output_dir=cfg.output_dir.replace("{run-id}", str(context.run_id))))

    return app


app = make_server_app()


def prepare_data(cfg: SimulationConfig, out: Path) -> str:
    if cfg.manifest:
        return manifest_path(cfg.manifest)
    existing = out / "data" / "manifest.csv"
    if cfg.resume and existing.is_file():
        return str(existing.resolve())
    print(f"generating synthetic hospitals under {out / 'data'}", flush=True)
    return str(generate(out / "data", cfg.synthetic()).resolve())


def prepare_checkpoint(cfg: SimulationConfig, manifest: str) -> str:
    """The base model every site starts from: given weights, or a cached warm start."""
    if cfg.pretrained:
        return cfg.pretrained
    print("warm start on the public population (cached after the first run)", flush=True)
    path = warm_start(
        manifest,
        cache_dir=cfg.cache_dir,
        model_config=ModelConfig(arch=cfg.arch),
        config=WarmStartConfig(epochs=cfg.warm_start_epochs, seed=cfg.seed),
    )
    return str(path.resolve())


def plan_noise(cfg: SimulationConfig) -> float:
    """The noise multiplier: given, or calibrated so that all planned rounds meet target-epsilon."""
    if cfg.dp_mode == "nonprivate" or cfg.dp_mode in INPUT_MODES:  # input modes: training adds no noise
        return 0.0
    if cfg.target_epsilon <= 0:
        return cfg.noise_multiplier
    dp = cfg.dp()
    releases = tuple(
        replace(e, steps=e.steps * cfg.num_rounds) for e in release_events(cfg.release(), privacy_unit=dp.privacy_unit)
    )
    return calibrate_noise_multiplier(
        target_epsilon=cfg.target_epsilon,
        delta=cfg.delta,
        sample_rate=cfg.sample_rate,
        steps=cfg.num_rounds * cfg.local_steps,
        relation=dp.relation,
        sensitivity=dp.sensitivity,
        accountant=cfg.accountant,
        alongside=releases,
    )


WRAP_TOLERANCE = 1e-6  # the largest chance per round that some coordinate of the secure sum wraps around


def plan_secure_sum(cfg: SimulationConfig, *, units: Mapping[str, int]) -> SecureSumPlan:
    """A secure sum's plan: the grid (``Grid.for_clip``: rounding adds secure-agg-rounding to the
    sensitivity), the total Skellam variance calibrated over every round (patient level: to
    target-epsilon, Poisson-sampled units; site level: to client-dp-epsilon, every site each round),
    each site's share of it (planned for ``threshold`` survivors), and a refusal of a sum too narrow to hold it."""
    bits, threshold, colluders = cfg.secure_sum_settings()
    patient = cfg.secure_level == "patient"
    clip = cfg.max_grad_norm if patient else cfg.client_clip_norm
    target = cfg.target_epsilon if patient else cfg.client_dp_epsilon
    rate = cfg.sample_rate if patient else 1.0
    model = create_model(cfg.model(pretrained=""), device="cpu").model  # its trainable coordinates, not weights
    grid = IntegerGrid.for_clip(clip=clip, dim=trainable_dim(model), bits=bits, rounding_share=cfg.secure_agg_rounding)
    sens = grid.sensitivity(clip=clip)
    sigma = (
        calibrate_skellam_noise(
            target_epsilon=target,
            delta=cfg.delta,
            sample_rate=rate,
            steps=cfg.num_rounds,
            grid_l2=sens.l2,
            grid_l1=sens.l1,
            privacy_unit=PrivacyUnit(cfg.privacy_unit),
        )
        if target > 0
        else cfg.noise_multiplier
    )
    secure = SecureSumPlan(
        bits=bits,
        threshold=threshold,
        colluders=colluders,
        scale=grid.scale,
        dim=grid.dim,
        share_variance=planned_share((sigma * sens.l2) ** 2, min_survivors=threshold),
        level=cfg.secure_level,
        clip=clip,
    )
    # utility only (the modular sum is post-processing): every coordinate must fit, with the most
    # units one step plausibly samples (a binomial tail of 1e-9) or every site's update, and every site's rounding
    total_units = sum(units.values()) or cfg.site_count() * (cfg.declared_units or cfg.planned_units())
    most = float(binom.isf(1e-9, total_units, cfg.sample_rate)) if patient else float(cfg.site_count())
    signal = most * grid.scale * clip + cfg.site_count()
    wrap = grid.wrap_probability(signal=signal, variance=cfg.site_count() * secure.share_variance)
    if wrap > WRAP_TOLERANCE:
        raise ValueError(
            f"secure-agg-bits: a sum of {bits} bits may wrap around (chance up to {wrap:.2g} per round, above "
            f"{WRAP_TOLERANCE:g}) with {total_units} units, sample-rate {cfg.sample_rate} and noise multiplier "
            f"{sigma:.3g}; widest for {cfg.site_count()} sites: {max_bits(cfg.site_count())} (a lower sample-rate, "
            "fewer sites, or a coarser grid, secure-agg-rounding above "
            f"{cfg.secure_agg_rounding:g}, which adds that share to the noise, leave more room)"
        )
    return secure


def secure_noise_multiplier(secure: SecureSumPlan) -> float:
    """The noise multiplier the plan's threshold shares carry together (noise std over the grid's L2 sensitivity)."""
    sens = secure.grid().sensitivity(clip=secure.clip)
    return math.sqrt(secure.threshold * secure.share_variance) / sens.l2


def train_config_record(
    cfg: SimulationConfig,
    *,
    noise_multiplier: float,
    manifest: str,
    checkpoint: str,
    round_offset: int = 0,
    declared_units: str = "",
    input_plan: InputPlan | None = None,
    run_name: str = "",
    gradient_canaries: str = "",
    secure: SecureSumPlan | None = None,
) -> ConfigRecord:
    """What every site is told each round: the round plan (``RoundPlan``), and nothing else.
    Simulated sites are also told where the shared data, base weights, site ledgers and site
    policies are; in a deployment the server sends no path of its own (a hospital reads its node
    config only)."""
    files = None
    if not cfg.deployment:
        out = Path(cfg.output_dir).resolve()
        files = SharedFiles(
            manifest=manifest,
            checkpoint=checkpoint,
            site_state_root=str(out / "sites"),
            site_policy_file=str(Path(cfg.site_policy_file).resolve()) if cfg.site_policy_file else "",
            declared_units_map=declared_units,
        )
    plan = replace(
        cfg.round_plan(noise_multiplier, input_plan),
        files=files,
        round_offset=round_offset,
        run_name=run_name,
        gradient_canaries=gradient_canaries,
        secure=secure,
    )
    return ConfigRecord(plan.to_record())


def canary_file(cfg: SimulationConfig, manifest: str) -> str:
    """The auditor's canary file: the configured one, or the one generated beside the data ("" if none)."""
    if cfg.canary_file:
        return cfg.canary_file
    generated = Path(manifest).with_name(CANARY_FILE)
    return str(generated) if not cfg.manifest and cfg.canaries and generated.is_file() else ""


def gradient_canary_audit(
    cfg: SimulationConfig, *, model, sites: tuple[str, ...], state: Path
) -> tuple[GradientCanaryAudit, GradientCanaryReplies, str] | None:
    """The auditor's Dirac canaries for every site, audited on the global model and on each site's
    replies (the server's view), and their plan for the train config; the secret (OS entropy) is kept in the server's state folder so a resumed run keeps its canaries."""
    if not cfg.gradient_canaries:
        return None
    secret_file = state / "gradient_canaries.secret"
    if not secret_file.is_file():
        state.mkdir(parents=True, exist_ok=True)
        secret_file.write_text(os.urandom(32).hex() + "\n")
    canaries = draw_dirac_canaries(
        model, per_site=cfg.gradient_canaries, sites=sites, secret=bytes.fromhex(secret_file.read_text().strip())
    )
    return GradientCanaryAudit(canaries, reference=model), GradientCanaryReplies(canaries), canaries_to_wire(canaries)


def auditor_attacks(cfg: SimulationConfig, *, manifest: str, model, preprocess, tokenizer) -> list[Attack]:
    """The auditor's attacks, run on the global model after every round.

    The auditor holds the attack's data (names and query photos of targets, members and not). In
    a simulation one person plays every party, so by default it is the generated data; in a
    deployment only an ``audit-manifest`` given to the server makes the server the auditor, and
    otherwise the auditor attacks the saved models later with ``fedclip audit``. With canaries the
    auditor also runs the canary audit (its reference: ``model`` as it is now, the base model)."""
    targets = cfg.audit_manifest or ("" if cfg.deployment else manifest)
    attacks: list[Attack] = []
    if targets:
        frame = load_manifest(targets, allow_outside_paths=cfg.allow_outside_paths).frame
        attacks += target_attacks(
            frame,
            idia=cfg.idia(),
            lira_records=cfg.lira_records if cfg.lira else 0,
            reference=model,
            preprocess=preprocess,
            tokenizer=tokenizer,
        )
    canaries = canary_file(cfg, manifest)
    if canaries:
        attacks.append(
            CanaryAudit(load_canaries(canaries), reference=model, preprocess=preprocess, tokenizer=tokenizer)
        )
    if not attacks:
        print(
            "no attack during this deployment: the auditor runs `fedclip audit RUN_DIR --targets FILE` on the "
            "models saved under models/",
            flush=True,
        )
    return attacks


def saved_round(cfg: SimulationConfig) -> int | None:
    """The round of the saved model to resume from, or None for a fresh run; refuses a folder that
    holds a run without ``resume``, and a resume without a ledger covering the saved model (it would
    restart or under-count privacy spending). Called by the CLI before Ray starts, and by ``run``."""
    state = Path(cfg.output_dir) / "state"
    progress, ledger = state / "global.pt", state / "ledger.sqlite"
    if progress.exists() and not cfg.resume:
        raise ValueError(
            f"output-dir: {cfg.output_dir} already holds a run; pass resume=true to continue it or choose "
            "another folder (on the deployment runtime, output-dir = '/abs/path/{run-id}' gives every run "
            "its own)"
        )
    if not cfg.resume:
        return None
    if not progress.exists():
        raise ValueError(f"resume: {cfg.output_dir} has no saved state to resume from")
    saved = int(torch.load(progress, map_location="cpu", weights_only=True)["round"])
    if not ledger.is_file():
        raise ValueError(
            f"resume: {ledger} is missing but the saved model is at round {saved}; "
            "resuming without it would restart privacy spending at zero"
        )
    store = LedgerStore(ledger, delta=cfg.delta, accountant=cfg.accountant, create=False)
    recorded = store.last_round()
    held = sorted({u for site in store.sites() for u in store.units(site)} - {cfg.privacy_unit})
    store.close()
    if held:
        raise ValueError(
            f"privacy-unit: {ledger} holds {'/'.join(held)}-level spending and this run is "
            f"{cfg.privacy_unit}-level; a resumed run keeps its privacy unit (one ledger composes one unit)"
        )
    if recorded < saved:
        raise ValueError(
            f"resume: {ledger} records {recorded} rounds but the saved model is at round {saved}; "
            "the ledger does not cover the model"
        )
    return saved


def durable_run_name(state: Path) -> str:
    """This run's name for the sites' ``max-epsilon-run``: drawn once, kept in the server's state
    folder, so a resumed run is the same run to a site (Flower gives each process a new run id)."""
    path = state / "run_name"
    if not path.is_file():
        state.mkdir(parents=True, exist_ok=True)
        path.write_text(os.urandom(8).hex() + "\n")
    return path.read_text().strip()


@dataclass
class RunFolder:
    """Where a run keeps its state, and how far an earlier attempt got."""

    out: Path
    files: RunFiles
    store: LedgerStore
    round_offset: int  # rounds already run (a resume), 0 for a fresh run
    saved: dict | None  # the saved global model of a resumed run

    @property
    def state(self) -> Path:
        return self.out / "state"


@dataclass(frozen=True)
class Prepared:
    """What the run resolved before any site is asked: data, base weights, noise, input plan."""

    manifest: str
    checkpoint: str
    sigma: float  # the sites' noise multiplier
    site_sigma: float  # client-level DP at the server (0: off)
    inputs: InputPlan | None  # an input-level privatization, released once per site
    shape: Any  # preflight's view of the data: sites and their units
    secure: SecureSumPlan | None = None  # dp-mode distributed: the grid and each site's noise share


def open_run_folder(cfg: SimulationConfig) -> RunFolder:
    """The output folder, its write-ahead ledger and tables; on resume, the saved model and round."""
    out = Path(cfg.output_dir)
    resumed_from = saved_round(cfg)
    saved = (
        torch.load(out / "state" / "global.pt", map_location="cpu", weights_only=True)
        if resumed_from is not None
        else None
    )
    folder = RunFolder(
        out=out,
        files=RunFiles(out),
        saved=saved,
        round_offset=resumed_from or 0,
        store=LedgerStore(out / "state" / "ledger.sqlite", delta=cfg.delta, accountant=cfg.accountant),
    )
    if saved:
        folder.files.truncate_after(folder.round_offset)
    return folder


def prepare(cfg: SimulationConfig, folder: RunFolder) -> Prepared:
    """Data, base weights, noise and the input plan, checked again on the data as generated; written to config.json."""
    if cfg.reproducible_noise:
        print(f"WARNING: {NOT_PRIVATE_AGAINST_THE_SERVER}", flush=True)
    manifest = prepare_data(cfg, folder.out)
    checkpoint = prepare_checkpoint(cfg, manifest)
    inputs = input_plan(cfg, manifest)  # dp-mode cadp | maskdp | mask-replace: the sites' one-time release
    shape = preflight(cfg, manifest)  # the same checks the CLI ran, now on the data as generated
    secure = plan_secure_sum(cfg, units=shape.units) if cfg.secure_level else None
    sigma = secure_noise_multiplier(secure) if secure is not None and secure.level == "patient" else plan_noise(cfg)
    site_sigma = (  # client-level noise added by the server (secure-agg: by the sites, in shares)
        calibrate_site_noise(target_epsilon=cfg.client_dp_epsilon, rounds=cfg.num_rounds, delta=cfg.delta)
        if cfg.client_dp_epsilon > 0 and secure is None
        else 0.0
    )
    folder.files.write_json(
        "config.json",
        {
            **cfg.to_run_config(),
            "resolved-manifest": manifest,
            "resolved-checkpoint": checkpoint,
            "resolved-noise-multiplier": sigma,
            # client-level noise: the server's own, or (secure-agg) the sum of the sites' shares
            "resolved-site-noise-multiplier": (
                secure_noise_multiplier(secure) if secure is not None and secure.level == "site" else site_sigma
            ),
            **(secure.to_record() if secure is not None else {}),
            **(inputs.to_record() if inputs is not None else {}),
            "private-against-the-server": not cfg.reproducible_noise,
            **({"privacy-warning": NOT_PRIVATE_AGAINST_THE_SERVER} if cfg.reproducible_noise else {}),
        },
    )
    folder.files.write_json("status.json", {"status": "running", "round": folder.round_offset})
    print(f"results: {folder.out.resolve()} (status.json says when the run has finished or failed)", flush=True)
    for site, units in shape.units.items():  # training units per site, as preflight counted them
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warn_if_delta_is_large(cfg.delta, units)
        for w in caught:
            print(f"warning ({site}): {w.message}", flush=True)
    return Prepared(
        manifest=manifest,
        checkpoint=checkpoint,
        sigma=sigma,
        site_sigma=site_sigma,
        inputs=inputs,
        shape=shape,
        secure=secure,
    )


def wire_settings(cfg: SimulationConfig, folder: RunFolder, prep: Prepared) -> dict[str, Any]:
    """``train_config_record``'s arguments for this run (the plan every site is sent)."""
    # each simulated site's public size: the synthetic plan's (fixed before the data exists), or the declared one
    declared = (
        "" if cfg.declared_units or cfg.deployment else ",".join(f"{s}={n}" for s, n in data_shape(cfg).units.items())
    )
    return dict(
        noise_multiplier=prep.sigma,
        manifest=prep.manifest,
        checkpoint=prep.checkpoint,
        round_offset=folder.round_offset,
        declared_units=declared,
        input_plan=prep.inputs,
        run_name=durable_run_name(folder.state),
        secure=prep.secure,
    )


def find_sites(grid: Grid, cfg: SimulationConfig, prep: Prepared, train_config: ConfigRecord) -> dict[int, str]:
    if cfg.deployment and not cfg.site_nodes:
        print(
            "WARNING: sites are identified by the name each SuperNode reports; set site-nodes to the node ids "
            "that `flwr supernode register` gave each hospital's key",
            flush=True,
        )
    return discover_sites(grid, train_config, expected=prep.shape.sites, node_ids=cfg.site_node_map() or None)


def make_strategy(
    cfg: SimulationConfig,
    folder: RunFolder,
    prep: Prepared,
    *,
    sites: Mapping[int, str],
    replies: Sequence[ReplyObserver],
    plan: RoundPlan,
    model: torch.nn.Module | None = None,
) -> PrivacyBudgetStrategy:
    """The inner strategy (client-level DP at the server, or the named one) wrapped by the budget strategy."""
    guarantee = plan.guarantee()
    release = plan.input_release()

    def planned_events(site: str):
        """The round's events, and the one-time input release until the site's ledger holds it
        (a site that released and lost its copy releases again and reports it: charged as reported)."""
        return plan.events() + ((release,) if release is not None and release not in folder.store.events(site) else ())

    def on_round(rows: list[SiteRound]) -> None:  # every row with an epsilon says what it is about
        folder.files.append("rounds", [{**r.as_dict(), **guarantee.as_columns()} for r in rows])

    inner = (
        with_site_level_dp(
            noise_multiplier=prep.site_sigma,
            clip_norm=cfg.client_clip_norm,
            num_sites=len(prep.shape.units),
            delta=cfg.delta,
        )
        if prep.site_sigma > 0
        else make_inner_strategy(cfg.strategy, fraction_train=cfg.fraction_train)
    )
    budget_kwargs = dict(
        store=folder.store,
        sites=sites,
        budget=cfg.budget_of,
        planned_events=planned_events,
        round_offset=folder.round_offset,
        on_round=on_round,
        failure_quorum=cfg.failure_quorum,
    )
    if prep.secure is not None:  # one DP-SGD step per round over a secure sum; the server steps a copy of the model
        return DistributedDpStrategy(
            inner,
            grid_spec=prep.secure.grid(),
            threshold=prep.secure.threshold,
            sample_rate=cfg.sample_rate,
            share_variance=prep.secure.share_variance,
            step=ServerStep(
                copy.deepcopy(model),
                lr=cfg.lr,
                optimizer=cfg.optimizer,
                state=(folder.saved or {}).get("server_state", {}).get("server_step"),
            ),
            level=prep.secure.level,
            neighbours=cfg.secure_agg_neighbours,
            **budget_kwargs,
        )
    if not replies:
        return PrivacyBudgetStrategy(inner, **budget_kwargs)

    on_reply, on_send = observe_each(replies)
    return PrivacyBudgetStrategy(inner, on_reply=on_reply, on_send=on_send, **budget_kwargs)


def simulated_site_ledgers(folder: RunFolder, cfg: SimulationConfig, *, sites: list[str]) -> dict[str, float]:
    """Each simulated site's epsilon by its own ledger (``sites/<site>/ledger.sqlite``; 0 if it never
    charged), read beside the server's for the summary; a deployed site's ledger stays at the site."""
    out = {}
    for site in sites:
        path = folder.out / "sites" / site / "ledger.sqlite"
        if not path.is_file():
            out[site] = 0.0
            continue
        store = LedgerStore(path, delta=cfg.delta, accountant=folder.store.accountant, create=False)
        try:
            out[site] = store.ledger(site).epsilon()
        finally:
            store.close()
    return out


def sites_not_trained(rounds) -> dict[str, dict[str, Any]]:
    """For ``fedclip status``: per site, how many selected rounds it refused, failed or was lost in,
    and the last one's round and reason (the rule a refusal names, or the error id of a failure)."""
    out: dict[str, dict[str, Any]] = {}
    if "status" not in rounds:
        return out
    for r in rounds[rounds["status"].isin(["refused", "failed", "lost"])].itertuples():
        site = out.setdefault(str(r.site), {"refused": 0, "failed": 0, "lost": 0})
        site[str(r.status)] += 1
        site["last"] = {"round": int(r.round), "status": str(r.status), "reason": _essence(str(r.reason))}
    return out


def _essence(reason: str) -> str:
    """The site's own words in an error reply that Flower or Ray wrapped: the refusal with its rule, or
    the redacted failure (``site_errors``), else the reason's last line."""
    for pattern in (rf"{REFUSAL}[^\n'\"]*", r"\S+ failed while [^\n'\"]*"):
        if found := re.search(pattern, reason):
            return found.group(0)[:300]
    return ([line for line in reason.splitlines() if line.strip()] or [""])[-1][:300]


def report(
    cfg: SimulationConfig, folder: RunFolder, prep: Prepared, *, failure: str | None, tracker: Tracker | None = None
) -> Path:
    """Site-level figures, plots, summary.md and status.json; the console's table."""
    crash_point(REPORT_PHASE, cfg.num_rounds)
    site_level = None
    if prep.site_sigma > 0:
        site_level = site_level_report(
            noise_multiplier=prep.site_sigma,
            clip_norm=cfg.client_clip_norm,
            releases=folder.store.aggregates(),
            num_sites=len(prep.shape.units),
            delta=cfg.delta,
        )
        folder.files.write_json("site_level.json", site_level)
    distributed = None
    if prep.secure is not None:
        distributed = distributed_report(
            folder.store.secure_sums(),
            event=prep.secure.event(cfg.dp(prep.sigma), shares=prep.secure.threshold),
            colluders=prep.secure.colluders,
            threshold=prep.secure.threshold,
            level=prep.secure.level,
            delta=cfg.delta,
        )
        folder.files.write_json("distributed.json", distributed)
        print("epsilon per adversary (distributed.json): " + json.dumps(distributed["epsilon"]), flush=True)
    files = folder.files
    rounds, attack, utility = files.read("rounds"), files.read("attack"), files.read("utility")
    plots = plot_run(folder.out, rounds, attack, utility, files.read("attack_scores"))
    if tracker is not None:
        tracker.log_images(plots, step=int(utility["round"].max()) if len(utility) else 0)
    summary = write_summary(
        folder.out / "summary.md",
        config={**cfg.to_run_config(), **(prep.inputs.to_record() if prep.inputs else {})},
        rounds=rounds,
        attack=attack,
        utility=utility,
        noise_multiplier=prep.sigma,
        site_level=site_level,
        distributed=distributed,
        failure=failure,
        site_ledgers=None
        if cfg.deployment
        else simulated_site_ledgers(folder, cfg, sites=sorted(set(rounds["site"])) if "site" in rounds else []),
    )
    files.write_json(
        "status.json",
        {
            "status": "failed" if failure else "finished",
            "reason": failure or "",
            "rounds": int(utility["round"].max()) if len(utility) else 0,
            # rounds in which a site trained: a run whose budgets were spent finishes with fewer (or none)
            "trained-rounds": int(rounds.loc[rounds["status"] == "trained", "round"].nunique())
            if "status" in rounds
            else 0,
            "sites-not-trained": sites_not_trained(rounds),
        },
    )
    if len(utility):
        print("\n" + run_table(utility, attack, rounds) + "\n", flush=True)
    return summary


def add_reference_models(
    cfg: SimulationConfig,
    prep: Prepared,
    bundle,
    *,
    on_model: Sequence[Attack],
    on_replies: Sequence[Attack],
    state: Path,
) -> None:
    """With ``lira-references`` > 0, the attacker's shadow federations (``fedclip.attacks.reference_models``:
    the run's recipe on the public population), scored by every likelihood-ratio attack of the view
    each reference stands for (the global model, or a site's reply) and dropped. Their scores are kept
    in ``state/`` (``fedclip.attacks.reference_cache``): a resumed run reads them back."""
    views = {
        "global": [a for a in on_model if hasattr(a, "add_reference")],
        "reply": [a for a in on_replies if hasattr(a, "add_reference")],
    }
    if not cfg.lira_references or not (views["global"] or views["reply"]):
        return
    frame = load_manifest(prep.manifest, allow_outside_paths=cfg.allow_outside_paths).frame
    sites = len(prep.shape.units)
    members = frame.loc[frame["split"] == str(Split.TRAIN), "patient_id"].nunique()
    recipe = {
        "count": cfg.lira_references,
        "sites": sites,
        "rounds": cfg.num_rounds,
        "patients": max(2, round(members / sites)),  # one site's size in patients
        "dp": cfg.dp(prep.sigma, declared_units=1),
        "train": cfg.train(),
        "seed": cfg.seed,
    }
    cache, key = state / REFERENCE_SCORES, recipe_key(**recipe)
    why = restore_references(cache, views, key=key)
    if not why:
        print(f"lira: the {cfg.lira_references} reference models' scores read back from {cache}", flush=True)
        return
    print(
        f"lira: training {cfg.lira_references} reference model{'s' if cfg.lira_references > 1 else ''} on the public "
        f"population (shadow federations of "
        f"{sites} sites x {cfg.num_rounds} rounds x {cfg.local_steps} steps: the run's training, each)"
        + (f"; saved scores not used: {why} ({cache})" if why != "none saved" else ""),
        flush=True,
    )
    public = load_pairs(
        frame[frame["split"] == str(Split.PUBLIC)], preprocess=bundle.preprocess, tokenizer=bundle.tokenizer
    )
    for reference in reference_models(bundle.model, public, **recipe):
        for attack in views[reference.view]:
            attack.add_reference(reference.model)
    save_references(cache, views, key=key)


def set_up_auditor(
    cfg: SimulationConfig, folder: RunFolder, prep: Prepared, bundle
) -> tuple[list[Attack], list[ReplyObserver], str]:
    """The auditor's attacks on the global model, its attacks on each reply (the server's view:
    IDIA and the patient likelihood-ratio attack, and the gradient canaries), and the gradient
    canaries' plan for the sites ("" if none)."""
    attacks = auditor_attacks(
        cfg, manifest=prep.manifest, model=bundle.model, preprocess=bundle.preprocess, tokenizer=bundle.tokenizer
    )
    on_replies = (
        [a.sibling() if hasattr(a, "sibling") else a for a in attacks if a.name in ("idia", "lira-patient")]
        if cfg.attack_replies != "off"
        else []
    )
    add_reference_models(cfg, prep, bundle, on_model=attacks, on_replies=on_replies, state=folder.state)
    when = reply_rounds(cfg.attack_replies, total_rounds=cfg.num_rounds)
    replies: list[ReplyObserver] = [ReplyAttack(a, model=bundle.model, when=when) for a in on_replies]
    gradient = gradient_canary_audit(cfg, model=bundle.model, sites=tuple(prep.shape.units), state=folder.state)
    if gradient is None:
        return attacks, replies, ""
    attacks.append(gradient[0])
    replies.append(gradient[1])
    return attacks, replies, gradient[2]


def open_tracker(cfg: SimulationConfig, folder: RunFolder, prep: Prepared) -> Tracker:
    """The run's experiment tracking (``tracking``), its config logged as the run resolved it."""
    uri, experiment, name = cfg.tracking_names()
    tracker = Tracker(
        backends=cfg.tracking_backends(),
        run_dir=folder.out,
        experiment=experiment,
        run_name=name,
        mlflow_uri=uri,
        resume=folder.saved is not None,
    )
    tracker.log_config({**cfg.to_run_config(), "resolved-noise-multiplier": prep.sigma})
    return tracker


def split_validation(heldout: pd.DataFrame, *, patients: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(validation, test): the first ``patients`` held-out patients by id, and the rest. The server's
    own data (no site holds them), so a score on the validation part is post-processing of the
    model; the test part stays untouched by any choice made on it."""
    ids = sorted(heldout["patient_id"].unique())
    if patients >= len(ids) > 0:
        raise ValueError(
            f"validation-patients: {patients} of the data's {len(ids)} held-out patients; keep some for the test set"
        )
    chosen = heldout["patient_id"].isin(ids[:patients])
    return heldout[chosen], heldout[~chosen]


def run(grid: Grid, cfg: SimulationConfig) -> Path:
    """The experiment, step by step: open the run folder, prepare, find the sites, set up the
    auditor, run the rounds under the budget strategy, report. However it ends, ``status.json``
    says so: a script polling ``fedclip status`` must never wait on a run that is gone."""
    if not cfg.deployment:  # simulated sites: keep Flower's in-memory engine's per-node polling small
        grid = WindowedGrid(grid, window=cfg.messages_in_flight)
    folder = open_run_folder(cfg)  # a refused resume raises here, leaving the earlier run's status as it was
    try:
        return _run_rounds(grid, cfg, folder)
    except BaseException as exc:
        status = folder.files.dir / "status.json"
        if not (status.is_file() and json.loads(status.read_text()).get("status") == "failed"):
            reason = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, SystemExit):  # Flower ends the ServerApp so when its SuperLink goes away
                reason = f"the ServerApp was stopped ({reason}): its SuperLink or the run was stopped; resume it"
            folder.files.write_json("status.json", {"status": "failed", "reason": reason, "rounds": None})
        raise


def _run_rounds(grid: Grid, cfg: SimulationConfig, folder: RunFolder) -> Path:
    prep = prepare(cfg, folder)
    wire = wire_settings(cfg, folder, prep)
    sites = find_sites(grid, cfg, prep, train_config_record(cfg, **wire))

    bundle = create_model(cfg.model(pretrained=prep.checkpoint), device=pick_device())
    initial = model_to_arrays(bundle.model, trainable_only=True)
    if folder.saved:
        initial = ArrayRecord(torch_state_dict=folder.saved["state_dict"])
        print(f"resuming after round {folder.round_offset}", flush=True)
    frame = load_manifest(prep.manifest, allow_outside_paths=cfg.allow_outside_paths).frame
    held, tested = split_validation(frame[frame["split"] == str(Split.HELDOUT)], patients=cfg.validation_patients)
    test = load_pairs(tested, preprocess=bundle.preprocess, tokenizer=bundle.tokenizer)
    validation = load_pairs(held, preprocess=bundle.preprocess, tokenizer=bundle.tokenizer) if len(held) else None
    attacks, replies, wire["gradient_canaries"] = set_up_auditor(cfg, folder, prep, bundle)
    with open_tracker(cfg, folder, prep) as tracker:  # a run that raises ends its MLflow run as FAILED
        plan = replace(cfg.round_plan(prep.sigma, prep.inputs), secure=prep.secure)  # what every site runs
        if prep.secure is not None and replies:  # both levels: no site's update reaches the server
            print(
                "the server sees only the secure sum: no site's reply to attack (the attacks on the global model stand)"
            )
            replies = []
        strategy = make_strategy(cfg, folder, prep, sites=sites, replies=replies, plan=plan, model=bundle.model)
        evaluator = RoundEvaluator(
            model=bundle.model,
            tokenizer=bundle.tokenizer,
            test=test,
            validation=validation,
            attacks=attacks,
            files=folder.files,
            epsilons=strategy.epsilons,
            delta=cfg.delta,
            state_dir=folder.state,
            round_offset=folder.round_offset,
            total_rounds=cfg.num_rounds,
            trained_this_round=lambda: not strategy.exhausted,
            strategy_seconds=lambda: strategy.strategy_seconds,
            reply_attacks=replies,
            comparable=plan.guarantee().membership,
            evaluate_every=cfg.evaluate_every,
            server_state=strategy.server_state,
            tracker=tracker,
        )
        failure = None
        if cfg.num_rounds > folder.round_offset:
            try:
                strategy.start(
                    grid,
                    initial,
                    num_rounds=cfg.num_rounds - folder.round_offset,
                    train_config=train_config_record(cfg, **wire),
                    evaluate_fn=evaluator,
                    timeout=cfg.round_timeout,
                )
            except SiteFailure as exc:
                failure = str(exc)
        evaluator.close()
        final_eps = strategy.epsilons()
        summary = report(cfg, folder, prep, failure=failure, tracker=tracker)
        folder.store.close()
        if failure:
            print(f"run stopped: {failure}", flush=True)
            raise SiteFailure(failure)
        print(f"done: {summary}", flush=True)
        print(json.dumps({"final_site_epsilon": {k: v if math.isfinite(v) else "inf" for k, v in final_eps.items()}}))
        return folder.out
