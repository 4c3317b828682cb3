"""The federation's ServerApp: prepare data and warm start, discover sites, run the strategy.

Read top to bottom, ``run`` is the whole experiment: resolve the config, make (or find) the
data and the warm-started model, ask every SuperNode which site it is, plan each site's next
round, then let ``PrivacyBudgetStrategy`` wrapping the inner strategy run the rounds, with IDIA
and utility after each through ``evaluate_fn``. Tables, plots and ``summary.md`` land in the
output folder.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedclip.attacks.base import Attack
from fedclip.attacks.canary import CanaryAudit
from fedclip.attacks.gradient_canaries import GradientCanaryAudit, canaries_to_wire, draw_dirac_canaries
from fedclip.attacks.replies import ReplyAttack, reply_rounds
from fedclip.attacks.suite import target_attacks
from fedclip.data.canaries import CANARY_FILE, load_canaries
from fedclip.data.manifest import load_manifest
from fedclip.data.schema import Split
from fedclip.data.synthetic import generate
from fedclip.data.tensors import load_pairs
from fedclip.models.arrays import model_to_arrays
from fedclip.models.factory import ModelConfig, create_model
from fedclip.privacy.calibration import calibrate_noise_multiplier, warn_if_delta_is_large
from fedclip.privacy.guarantee import guarantee_of
from fedclip.privacy.ledger_store import LedgerStore
from fedclip.privacy.randomness import NOT_PRIVATE_AGAINST_THE_SERVER
from fedclip.privacy.release import release_events
from fedclip.privacy.modes import INPUT_MODES
from fedclip.privatize.plan import InputPlan
from fedclip.reporting.console_table import run_table
from fedclip.reporting.plots import plot_run
from fedclip.reporting.run_files import RunFiles
from fedclip.reporting.summary import write_summary
from fedclip.training.warmstart import WarmStartConfig, warm_start
from simulations.hospital_clip.config import DEFAULT_TOML, SimulationConfig, load_toml
from simulations.hospital_clip.evaluator import RoundEvaluator
from simulations.hospital_clip.input_privacy import input_plan
from simulations.hospital_clip.preflight import data_shape, preflight
from simulations.hospital_clip.plan import SharedFiles
from simulations.hospital_clip.task import manifest_path, pick_device
from strategies.client_level import calibrate_site_noise, site_level_report, with_site_level_dp
from strategies.privacy_budget import PrivacyBudgetStrategy, SiteFailure, SiteRound
from strategies.registry import make_inner_strategy
from strategies.windowed_grid import WindowedGrid


# run-config keys that are paths on the server's machine: never sent to a site
SERVER_PATHS = ("manifest", "pretrained", "output-dir", "cache-dir", "site-policy-file", "audit-manifest")


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
    path = warm_start(manifest, cache_dir=cfg.cache_dir, model_config=ModelConfig(arch=cfg.arch),
                      config=WarmStartConfig(epochs=cfg.warm_start_epochs, seed=cfg.seed))
    return str(path.resolve())


def discover_sites(grid: Grid, config: ConfigRecord, *, expected: Sequence[str], node_ids: Mapping[str, int] | None = None,
                   timeout: float = 600.0) -> dict[int, str]:
    """Which node is which site: {node id: site}.

    With ``node_ids`` (a deployment's ``site-nodes``: ids the SuperLink gave registered keys) the
    mapping is the operator's, and each node's own answer must agree with it; other nodes are not
    asked and never selected. Without it each node is asked (a QUERY whose reply names the site
    only) and must name a distinct ``expected`` site. A node that does not answer within
    ``timeout`` stops the run: without its name the budget strategy could select nobody, and the
    run would train nothing while claiming to be finished."""
    wanted = set((node_ids or {}).values())
    deadline = time.time() + timeout

    def ready(nodes: list[int]) -> bool:
        return wanted <= set(nodes) if wanted else len(nodes) >= len(expected)

    while not ready(nodes := list(grid.get_node_ids())):
        if time.time() > deadline:
            waiting = f"node ids {sorted(wanted - set(nodes))}" if wanted else f"{len(expected)} SuperNodes"
            raise RuntimeError(f"only {len(nodes)} SuperNodes connected within {timeout:.0f}s, waiting for {waiting}")
        time.sleep(0.5)
    if wanted:
        ignored = sorted(set(nodes) - wanted)
        if ignored:
            print(f"node(s) {ignored} are connected but not in site-nodes: not asked, never selected", flush=True)
        nodes = sorted(wanted)
    messages = [Message(RecordDict({"config": config}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    sites: dict[int, str] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            raise RuntimeError(f"node {node} failed to say which site it is: {reply.error.reason}")
        sites[node] = str(reply.content["site"]["site"])
    silent = sorted(set(nodes) - set(sites))
    if silent:
        raise RuntimeError(f"node(s) {silent} did not say which site they are within {timeout:.0f}s "
                           f"({len(sites)} of {len(nodes)} answered); the run cannot select them")
    if node_ids:
        site_of = {node: site for site, node in node_ids.items()}
        wrong = [f"node {n} is registered as {site_of[n]!r} but says it is {s!r}" for n, s in sites.items()
                 if s != site_of[n]]
        if wrong:
            raise RuntimeError("site-nodes: " + "; ".join(wrong))
        return {n: site_of[n] for n in sites}
    claimed = sorted(sites.values())
    strangers = sorted(set(claimed) - set(expected))
    if strangers:
        raise RuntimeError(f"node(s) claim sites {strangers} that are not expected (sites: {sorted(expected)})")
    if len(set(claimed)) != len(claimed):
        twice = sorted({c for c in claimed if claimed.count(c) > 1})
        raise RuntimeError(f"two nodes claim the same site {twice}; each site must run exactly one SuperNode")
    return sites


def plan_noise(cfg: SimulationConfig) -> float:
    """The noise multiplier: given, or calibrated so that all planned rounds meet target-epsilon."""
    if cfg.dp_mode == "nonprivate" or cfg.dp_mode in INPUT_MODES:  # input modes: training adds no noise
        return 0.0
    if cfg.target_epsilon <= 0:
        return cfg.noise_multiplier
    dp = cfg.dp()
    releases = tuple(replace(e, steps=e.steps * cfg.num_rounds)
                     for e in release_events(cfg.release(), privacy_unit=dp.privacy_unit))
    return calibrate_noise_multiplier(target_epsilon=cfg.target_epsilon, delta=cfg.delta, sample_rate=cfg.sample_rate,
                                      steps=cfg.num_rounds * cfg.local_steps, relation=dp.relation,
                                      sensitivity=dp.sensitivity, accountant=cfg.accountant, alongside=releases)


def train_config_record(cfg: SimulationConfig, *, noise_multiplier: float, manifest: str, checkpoint: str,
                        round_offset: int = 0, declared_units: str = "", input_plan: InputPlan | None = None,
                        run_name: str = "", gradient_canaries: str = "") -> ConfigRecord:
    """What every site is told each round: the round plan (``RoundPlan``), and nothing else.
    Simulated sites are also told where the shared data, base weights, site ledgers and site
    policies are; in a deployment the server sends no path of its own (a hospital reads its node
    config only)."""
    files = None
    if not cfg.deployment:
        out = Path(cfg.output_dir).resolve()
        files = SharedFiles(manifest=manifest, checkpoint=checkpoint, site_state_root=str(out / "sites"),
                            site_policy_file=str(Path(cfg.site_policy_file).resolve()) if cfg.site_policy_file else "",
                            declared_units_map=declared_units)
    plan = replace(cfg.round_plan(noise_multiplier, input_plan), files=files, round_offset=round_offset,
                   run_name=run_name, gradient_canaries=gradient_canaries)
    return ConfigRecord(plan.to_record())


def canary_file(cfg: SimulationConfig, manifest: str) -> str:
    """The auditor's canary file: the configured one, or the one generated beside the data ("" if none)."""
    if cfg.canary_file:
        return cfg.canary_file
    generated = Path(manifest).with_name(CANARY_FILE)
    return str(generated) if not cfg.manifest and cfg.canaries and generated.is_file() else ""


def gradient_canary_audit(cfg: SimulationConfig, *, model, sites: tuple[str, ...],
                          state: Path) -> tuple[GradientCanaryAudit, str] | None:
    """The auditor's Dirac canaries for every site, and their plan for the train config; the secret
    (OS entropy) is kept in the server's state folder so a resumed run keeps its canaries."""
    if not cfg.gradient_canaries:
        return None
    secret_file = state / "gradient_canaries.secret"
    if not secret_file.is_file():
        state.mkdir(parents=True, exist_ok=True)
        secret_file.write_text(os.urandom(32).hex() + "\n")
    canaries = draw_dirac_canaries(model, per_site=cfg.gradient_canaries, sites=sites,
                                   secret=bytes.fromhex(secret_file.read_text().strip()))
    return GradientCanaryAudit(canaries, reference=model), canaries_to_wire(canaries)


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
        attacks += target_attacks(frame, idia=cfg.idia(), lira_records=cfg.lira_records if cfg.lira else 0,
                                  reference=model, preprocess=preprocess, tokenizer=tokenizer)
    canaries = canary_file(cfg, manifest)
    if canaries:
        attacks.append(CanaryAudit(load_canaries(canaries), reference=model, preprocess=preprocess, tokenizer=tokenizer))
    if not attacks:
        print("no attack during this deployment: the auditor runs `fedclip audit RUN_DIR --targets FILE` on the "
              "models saved under models/", flush=True)
    return attacks


def saved_round(cfg: SimulationConfig) -> int | None:
    """The round of the saved model to resume from, or None for a fresh run; refuses a folder that
    holds a run without ``resume``, and a resume without a ledger covering the saved model (it would
    restart or under-count privacy spending). Called by the CLI before Ray starts, and by ``run``."""
    state = Path(cfg.output_dir) / "state"
    progress, ledger = state / "global.pt", state / "ledger.sqlite"
    if progress.exists() and not cfg.resume:
        raise ValueError(f"output-dir: {cfg.output_dir} already holds a run; pass resume=true to continue it or choose "
                         "another folder (on the deployment runtime, output-dir = '/abs/path/{run-id}' gives every run "
                         "its own)")
    if not cfg.resume:
        return None
    if not progress.exists():
        raise ValueError(f"resume: {cfg.output_dir} has no saved state to resume from")
    saved = int(torch.load(progress, map_location="cpu", weights_only=True)["round"])
    if not ledger.is_file():
        raise ValueError(f"resume: {ledger} is missing but the saved model is at round {saved}; "
                         "resuming without it would restart privacy spending at zero")
    store = LedgerStore(ledger, delta=cfg.delta, accountant=cfg.accountant, create=False)
    recorded = store.last_round()
    held = sorted({u for site in store.sites() for u in store.units(site)} - {cfg.privacy_unit})
    store.close()
    if held:
        raise ValueError(f"privacy-unit: {ledger} holds {'/'.join(held)}-level spending and this run is "
                         f"{cfg.privacy_unit}-level; a resumed run keeps its privacy unit (one ledger composes one unit)")
    if recorded < saved:
        raise ValueError(f"resume: {ledger} records {recorded} rounds but the saved model is at round {saved}; "
                         "the ledger does not cover the model")
    return saved


def durable_run_name(state: Path) -> str:
    """This run's name for the sites' ``max-epsilon-run``: drawn once, kept in the server's state
    folder, so a resumed run is the same run to a site (Flower gives each process a new run id)."""
    path = state / "run_name"
    if not path.is_file():
        state.mkdir(parents=True, exist_ok=True)
        path.write_text(os.urandom(8).hex() + "\n")
    return path.read_text().strip()


def run(grid: Grid, cfg: SimulationConfig) -> Path:
    if not cfg.deployment:  # simulated sites: keep Flower's in-memory engine's per-node polling small
        grid = WindowedGrid(grid, window=cfg.messages_in_flight)
    out = Path(cfg.output_dir)
    state = out / "state"
    resumed_from = saved_round(cfg)
    saved = torch.load(state / "global.pt", map_location="cpu", weights_only=True) if resumed_from is not None else None
    round_offset = resumed_from or 0
    store = LedgerStore(state / "ledger.sqlite", delta=cfg.delta, accountant=cfg.accountant)
    files = RunFiles(out)
    if saved:
        files.truncate_after(round_offset)
    if cfg.reproducible_noise:
        print(f"WARNING: {NOT_PRIVATE_AGAINST_THE_SERVER}", flush=True)
    manifest = prepare_data(cfg, out)
    checkpoint = prepare_checkpoint(cfg, manifest)
    sigma = plan_noise(cfg)
    inputs = input_plan(cfg, manifest)  # dp-mode cadp | maskdp | mask-replace: the sites' one-time release
    shape = preflight(cfg, manifest)  # the same checks the CLI ran, now on the data as generated
    site_sigma = (calibrate_site_noise(target_epsilon=cfg.client_dp_epsilon, rounds=cfg.num_rounds,
                                       delta=cfg.delta) if cfg.client_dp_epsilon > 0 else 0.0)
    files.write_json("config.json", {**cfg.to_run_config(), "resolved-manifest": manifest,
                                     "resolved-checkpoint": checkpoint, "resolved-noise-multiplier": sigma,
                                     "resolved-site-noise-multiplier": site_sigma,
                                     **(inputs.to_record() if inputs is not None else {}),
                                     "private-against-the-server": not cfg.reproducible_noise,
                                     **({"privacy-warning": NOT_PRIVATE_AGAINST_THE_SERVER} if cfg.reproducible_noise else {})})
    files.write_json("status.json", {"status": "running", "round": round_offset})
    print(f"results: {out.resolve()} (status.json says when the run has finished or failed)", flush=True)

    # each simulated site's public size: the synthetic plan's (fixed before the data exists), or the declared one
    declared = "" if cfg.declared_units or cfg.deployment else ",".join(
        f"{s}={n}" for s, n in data_shape(cfg).units.items())
    wire = dict(noise_multiplier=sigma, manifest=manifest, checkpoint=checkpoint, round_offset=round_offset,
                declared_units=declared, input_plan=inputs, run_name=durable_run_name(state))
    train_config = train_config_record(cfg, **wire)
    if cfg.deployment and not cfg.site_nodes:
        print("WARNING: sites are identified by the name each SuperNode reports; set site-nodes to the node ids "
              "that `flwr supernode register` gave each hospital's key", flush=True)
    sites = discover_sites(grid, train_config, expected=shape.sites, node_ids=cfg.site_node_map() or None)
    plan = cfg.round_plan(sigma, inputs)
    release = plan.input_release()

    def planned_events(site: str):
        """The round's events, and the one-time input release until the site's ledger holds it
        (a site that released and lost its copy releases again and reports it: charged as reported)."""
        return plan.events() + ((release,) if release is not None and release not in store.events(site) else ())
    for site, units in shape.units.items():  # training units per site, as preflight counted them
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warn_if_delta_is_large(cfg.delta, units)
        for w in caught:
            print(f"warning ({site}): {w.message}", flush=True)

    device = pick_device()
    bundle = create_model(cfg.model(pretrained=checkpoint), device=device)
    initial = model_to_arrays(bundle.model, trainable_only=True)
    if saved:
        initial = ArrayRecord(torch_state_dict=saved["state_dict"])
        print(f"resuming after round {round_offset}", flush=True)
    remaining = cfg.num_rounds - round_offset
    frame = load_manifest(manifest, allow_outside_paths=cfg.allow_outside_paths).frame
    test = load_pairs(frame[frame["split"] == str(Split.HELDOUT)], preprocess=bundle.preprocess, tokenizer=bundle.tokenizer)
    attacks = auditor_attacks(cfg, manifest=manifest, model=bundle.model, preprocess=bundle.preprocess,
                              tokenizer=bundle.tokenizer)
    gradient = gradient_canary_audit(cfg, model=bundle.model, sites=tuple(shape.units), state=state)
    if gradient is not None:
        attacks.append(gradient[0])
        train_config = train_config_record(cfg, **wire, gradient_canaries=gradient[1])

    idia = next((a for a in attacks if a.name == "idia"), None)
    replies = (ReplyAttack(idia, model=bundle.model, when=reply_rounds(cfg.attack_replies, total_rounds=cfg.num_rounds))
               if idia is not None and cfg.attack_replies != "off" else None)

    guarantee = guarantee_of(mode=plan.mode, privacy_unit=cfg.privacy_unit, microbatch_size=cfg.microbatch_size)

    def on_round(rows: list[SiteRound]) -> None:  # every row with an epsilon says what it is about
        files.append("rounds", [{**r.as_dict(), **guarantee.as_columns()} for r in rows])

    inner = (with_site_level_dp(noise_multiplier=site_sigma, clip_norm=cfg.client_clip_norm, num_sites=len(shape.units),
                                delta=cfg.delta) if site_sigma > 0
             else make_inner_strategy(cfg.strategy, fraction_train=cfg.fraction_train))
    strategy = PrivacyBudgetStrategy(
        inner, store=store, sites=sites, budget=cfg.budget_of, planned_events=planned_events,
        round_offset=round_offset, on_round=on_round, failure_quorum=cfg.failure_quorum,
        on_reply=replies.observe if replies else None,
    )
    evaluator = RoundEvaluator(model=bundle.model, tokenizer=bundle.tokenizer, test=test, attacks=attacks, files=files,
                               epsilons=strategy.epsilons, delta=cfg.delta, state_dir=state, round_offset=round_offset,
                               total_rounds=cfg.num_rounds, trained_this_round=lambda: not strategy.exhausted,
                               strategy_seconds=lambda: strategy.strategy_seconds, reply_attack=replies,
                               comparable=guarantee.membership)
    failure = None
    if remaining > 0:
        try:
            strategy.start(grid, initial, num_rounds=remaining, train_config=train_config, evaluate_fn=evaluator)
        except SiteFailure as exc:
            failure = str(exc)
    evaluator.close()
    final_eps = strategy.epsilons()
    site_level = None
    if site_sigma > 0:
        site_level = site_level_report(noise_multiplier=site_sigma, clip_norm=cfg.client_clip_norm,
                                       releases=store.aggregates(), num_sites=len(shape.units), delta=cfg.delta)
        files.write_json("site_level.json", site_level)
    store.close()
    rounds, attack, utility = files.read("rounds"), files.read("attack"), files.read("utility")
    plot_run(out, rounds, attack, utility, files.read("attack_scores"))
    summary = write_summary(out / "summary.md", config={**cfg.to_run_config(), **(inputs.to_record() if inputs else {})},
                            rounds=rounds, attack=attack,
                            utility=utility, noise_multiplier=sigma, site_level=site_level, failure=failure)
    files.write_json("status.json", {"status": "failed" if failure else "finished", "reason": failure or "",
                                     "rounds": int(utility["round"].max()) if len(utility) else 0})
    if len(utility):
        print("\n" + run_table(utility, attack, rounds) + "\n", flush=True)
    if failure:
        print(f"run stopped: {failure}", flush=True)
        raise SiteFailure(failure)
    print(f"done: {summary}", flush=True)
    print(json.dumps({"final_site_epsilon": {k: v if math.isfinite(v) else "inf" for k, v in final_eps.items()}}))
    return out
