"""``flower-simulation``: run a fedclip Flower app on Ray through ``flwr.simulation.run_simulation``.

    flower-simulation --app simulations.hospital_clip [--num-supernodes N]
                      [--run-config "key=value ..." | file.toml] [--backend-config JSON] [--output DIR]

Flower 1.41 removed its own ``flower-simulation`` command; this one keeps the workflow. The run
config is validated before Ray starts, and a bad key or value fails with the key named.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from fedclip.console import quiet_known_noise
from fedclip.progress import decide_progress


def parse_run_config(text: str | None) -> dict[str, Any]:
    """``"a=1 b='x' c=true"`` (values in TOML syntax; bare words are strings), TOML files
    (``small.toml``), or both (``"small.toml num-rounds=2"``): later items override earlier ones."""
    if not text:
        return {}
    out: dict[str, Any] = {}
    for item in shlex.split(text):
        key, sep, raw = item.partition("=")
        if not sep and item.endswith(".toml"):
            from simulations.hospital_clip.config import load_toml

            if not Path(item).is_file():
                raise ValueError(f"--run-config: file not found: {item}")
            out.update(load_toml(item))
            continue
        if not sep or not key:
            raise ValueError(f"--run-config: expected key=value or a .toml file, got {item!r}")
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw
    return out


def _check_backend(config: dict[str, Any]) -> dict[str, Any]:
    resources = config.get("client_resources")
    if not isinstance(resources, dict):
        raise ValueError("--backend-config: client_resources: expected a JSON object")
    for key, value in resources.items():
        if key not in ("num_cpus", "num_gpus"):
            raise ValueError(f"--backend-config: client_resources.{key}: unknown; expected num_cpus and num_gpus")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value != value:
            raise ValueError(f"--backend-config: client_resources.{key}: expected a number >= 0, got {value!r}")
    if not resources.get("num_cpus", 1) > 0:
        raise ValueError("--backend-config: client_resources.num_cpus: expected a number > 0")
    if not isinstance(config.get("init_args", {}), dict):
        raise ValueError("--backend-config: init_args: expected a JSON object")
    return config


def parse_backend_config(text: str | None, *, use_gpu: bool) -> dict[str, Any]:
    # address "local": a fresh Ray instance for this run, never silently the last cluster `ray start`
    # (or ray.cluster_utils) left on this machine; a cluster is joined only when its address is given
    config: dict[str, Any] = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"include_dashboard": False, "address": "local"},
    }
    if use_gpu:
        config["client_resources"]["num_gpus"] = 0.25  # four sites share one GPU unless told otherwise
    if text:
        try:
            user = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--backend-config: not valid JSON: {exc}") from exc
        if not isinstance(user, dict):
            raise ValueError("--backend-config: expected a JSON object")
        for key, value in user.items():
            config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return _check_backend(config)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flower-simulation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--app", required=True, help="module of the app, e.g. simulations.hospital_clip")
    p.add_argument("--num-supernodes", type=int, default=None, help="default: one per site")
    p.add_argument("--run-config", default=None, help='"key=value ..." or a TOML file')
    p.add_argument(
        "--backend-config", default=None, help='JSON, e.g. {"client_resources": {"num_cpus": 1, "num_gpus": 0.5}}'
    )
    p.add_argument("--output", default=None, help="run folder (sets output-dir)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_known_noise()  # known third-party warnings, by exact text, here and in Ray's actors
    try:
        module = importlib.import_module(args.app)
        if not hasattr(module, "make_server_app") or not hasattr(module, "client_app"):
            raise ValueError(f"--app: {args.app} has no make_server_app and client_app")
        from fedclip.privacy.randomness import NOT_PRIVATE_AGAINST_THE_SERVER
        from simulations.hospital_clip.preflight import preflight
        from simulations.hospital_clip.server_app import (
            default_run_config,
            plan_secure_sum,
            resolve_config,
            saved_round,
        )

        overrides = parse_run_config(args.run_config)
        if args.output:
            overrides["output-dir"] = args.output
        cfg = resolve_config(default_run_config(), overrides)  # fails here, before Ray, naming the key
        if cfg.deployment:
            raise ValueError(
                "sites: declared sites are a deployment (each hospital's SuperNode with its own node "
                "config, started by `flwr run`); flower-simulation simulates the sites of its data, so "
                "leave 'sites' and 'site-nodes' empty (docs/federation.md, 'Running as a consortium')"
            )
        if "{run-id}" in cfg.output_dir:
            raise ValueError(
                "output-dir: '{run-id}' is filled in on the deployment runtime; flower-simulation needs "
                "a folder it can check after the run: pass --output DIR"
            )
        saved_round(cfg)  # a folder that holds a run, or a resume without its ledger, fails before Ray too
        shape = preflight(cfg)  # site names, sizes, delta: before Ray too
        sites = len(shape.sites)
        if cfg.secure_level:  # a secure sum's grid, noise and width: a sum that may wrap fails here
            plan_secure_sum(cfg, units=shape.units)
        supernodes = args.num_supernodes or sites
        if supernodes != sites:
            raise ValueError(f"--num-supernodes: {supernodes}, but the data has {sites} sites (one SuperNode per site)")
        import torch

        backend = parse_backend_config(args.backend_config, use_gpu=torch.cuda.is_available())
        decide_progress()  # bars if this terminal is watched; Ray's actors follow it
    except (ValueError, ImportError) as exc:
        print(f"flower-simulation: error: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation

    print(f"flower-simulation: {args.app}, {supernodes} SuperNodes, output {cfg.output_dir}", flush=True)
    if cfg.reproducible_noise:
        print(f"flower-simulation: WARNING: {NOT_PRIVATE_AGAINST_THE_SERVER}", file=sys.stderr, flush=True)
    started = time.time()
    run_simulation(
        server_app=module.make_server_app(overrides),
        client_app=module.client_app,
        num_supernodes=supernodes,
        backend_config=backend,
    )
    return _exit_status(Path(cfg.output_dir), started)


def _exit_status(out: Path, started: float) -> int:
    """0 only if this run wrote a finished status; a stopped run names its reason."""
    status_file = out / "status.json"
    status = (
        json.loads(status_file.read_text()) if status_file.is_file() and status_file.stat().st_mtime >= started else {}
    )
    if status.get("status") == "finished":
        return 0
    if status.get("status") == "failed":
        print(
            f"flower-simulation: error: the run stopped: {status.get('reason')} (see {out / 'summary.md'})",
            file=sys.stderr,
        )
        return 1
    print(f"flower-simulation: error: the run did not finish; see the log above ({out})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
