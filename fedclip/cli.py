"""The ``fedclip`` command: data generation, warm start and evaluation of the embedded default.

    fedclip prepare [--out runs/default]   generate the data, warm-start, evaluate, write a table
    fedclip data --out DIR [--seed N]      only generate the synthetic data set
    fedclip warmstart --manifest FILE      only pretrain (or find the cached checkpoint)
    fedclip compare [--config FILE]        central vs federated DP: a matrix of federation runs
    fedclip audit RUN_DIR --targets FILE   the auditor: IDIA (and --canaries FILE) on every saved round model
    fedclip status RUN_DIR                 a run's status; exit 0 finished, 1 failed, 3 running or unknown
    fedclip spending STATE_DIR             a site's own privacy spending, from its own ledger
    fedclip site-worker --site S --socket P a hospital's long-lived worker (node config site-worker=P)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from fedclip.data.manifest import load_manifest
from fedclip.data.names import NAME_LISTS
from fedclip.data.schema import Split
from fedclip.data.synthetic import SyntheticConfig, generate
from fedclip.data.tensors import load_pairs
from fedclip.evaluation.retrieval import retrieval_recall
from fedclip.evaluation.zero_shot import zero_shot_accuracy
from fedclip.models.factory import ModelConfig, create_model
from fedclip.training.warmstart import WarmStartConfig, warm_start


def _print_epoch(epoch: int, loss: float) -> None:
    print(f"  warm start epoch {epoch}: loss {loss:.3f}", flush=True)


def evaluate_checkpoints(manifest: Path, checkpoints: dict[str, str]) -> pd.DataFrame:
    """Zero-shot accuracy and retrieval recall on the held-out split, one row per checkpoint."""
    rows = []
    frame = load_manifest(manifest).rows(Split.HELDOUT)
    for label, path in checkpoints.items():
        bundle = create_model(ModelConfig(pretrained=path))
        data = load_pairs(frame, preprocess=bundle.preprocess, tokenizer=bundle.tokenizer)
        rows.append({"model": label, "zero_shot_accuracy": zero_shot_accuracy(bundle.model, bundle.tokenizer, data),
                     **retrieval_recall(bundle.model, data), "heldout_images": len(data)})
    return pd.DataFrame(rows)


def _synthetic_config(args: argparse.Namespace) -> SyntheticConfig:
    return SyntheticConfig(seed=args.seed, num_sites=args.num_sites, patients_per_site=args.patients_per_site,
                           public_patients=args.public_patients, heldout_patients=args.heldout_patients,
                           site_skew=args.site_skew, name_lists=args.name_lists)


def _add_data_options(p: argparse.ArgumentParser) -> None:
    d = SyntheticConfig()
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--num-sites", type=int, default=d.num_sites)
    p.add_argument("--patients-per-site", type=int, default=d.patients_per_site)
    p.add_argument("--public-patients", type=int, default=d.public_patients)
    p.add_argument("--heldout-patients", type=int, default=d.heldout_patients)
    p.add_argument("--site-skew", type=float, default=d.site_skew, help="Dirichlet concentration; 0 = balanced")
    p.add_argument("--name-lists", choices=NAME_LISTS, default=d.name_lists,
                   help="name lists of the patients: census gives most patients their own surname (names leak more)")


def cmd_data(args: argparse.Namespace) -> int:
    manifest = generate(args.out, _synthetic_config(args))
    print(f"wrote {manifest}")
    return 0


def cmd_warmstart(args: argparse.Namespace) -> int:
    path = warm_start(args.manifest, cache_dir=args.cache_dir, config=WarmStartConfig(epochs=args.epochs), progress=_print_epoch)
    print(f"warm-start checkpoint: {path}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    out = Path(args.out)
    print(f"[1/3] generating synthetic hospitals under {out / 'data'}", flush=True)
    manifest = generate(out / "data", _synthetic_config(args))
    print("[2/3] warm start on the public population (cached after the first run)", flush=True)
    ckpt = warm_start(manifest, cache_dir=out / "cache", config=WarmStartConfig(epochs=args.epochs, seed=args.seed),
                      progress=_print_epoch)
    print("[3/3] evaluating on held-out patients", flush=True)
    table = evaluate_checkpoints(manifest, {"random init": "", "warm start": str(ckpt)})
    table.to_csv(out / "warmstart_eval.csv", index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"checkpoint: {ckpt}\ntable: {out / 'warmstart_eval.csv'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    # the comparison drives the Flower apps, so it lives with them in simulations/
    from simulations.compare.config import DEFAULT_COMPARE_TOML, CompareConfig
    from simulations.compare.results import write_outputs
    from simulations.compare.runner import finished_runs, run_all

    config = CompareConfig.from_toml(args.config or DEFAULT_COMPARE_TOML)
    if args.output:
        config = CompareConfig(**{**config.__dict__, "output_dir": args.output})
    try:
        runs = finished_runs(config) if args.report else run_all(config)
    except RuntimeError as exc:
        print(f"fedclip: error: {exc}", file=sys.stderr)
        return 1
    paths = write_outputs(config.output_dir, runs)
    print(paths["markdown"].read_text())
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from simulations.hospital_clip.audit import audit_run

    out = audit_run(args.run_dir, targets=args.targets, checkpoint=args.checkpoint or "", out_dir=args.out,
                    allow_outside_paths=args.allow_outside_paths, canaries=args.canaries)
    print((out / "summary.md").read_text())
    print(f"audit: {out}")
    return 0


STATUS_EXIT = {"finished": 0, "failed": 1}


def cmd_status(args: argparse.Namespace) -> int:
    """Exit codes a script can branch on (``flwr run --stream`` exits 0 even when the ServerApp fails)."""
    path = Path(args.run_dir) / "status.json"
    if not path.is_file():
        print(f"fedclip: {path}: no status (the run has not started here, or this is not a run folder)", file=sys.stderr)
        return 3
    status = json.loads(path.read_text())
    print(json.dumps(status, indent=2, sort_keys=True))
    return STATUS_EXIT.get(status.get("status"), 3)


def cmd_spending(args: argparse.Namespace) -> int:
    from fedclip.privacy.ledger_store import LedgerStore
    from fedclip.reporting.spending import write_spending

    ledger = Path(args.state_dir) / "ledger.sqlite"
    if not ledger.is_file():
        raise ValueError(f"state-dir: no ledger at {ledger}; pass the state-dir of the site's node config")
    store = LedgerStore(ledger, delta=args.delta, accountant=args.accountant, create=False)
    try:
        print(write_spending(store, args.state_dir).read_text())
    finally:
        store.close()
    return 0


def cmd_site_worker(args: argparse.Namespace) -> int:
    """Serve until stopped; SIGTERM (as from a service manager) removes the socket like Ctrl-C."""
    import signal

    from simulations.hospital_clip.site_worker import serve

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(args.socket, site=args.site, max_messages=args.max_messages, on_line=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedclip", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="generate data, warm-start and evaluate the embedded default")
    p.add_argument("--out", default="runs/default")
    _add_data_options(p)
    p.add_argument("--epochs", type=int, default=WarmStartConfig.epochs)
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("data", help="generate the synthetic multi-hospital data set")
    p.add_argument("--out", required=True)
    _add_data_options(p)
    p.set_defaults(func=cmd_data)
    p = sub.add_parser("warmstart", help="pretrain the tiny model on a manifest's public rows")
    p.add_argument("--manifest", required=True)
    p.add_argument("--cache-dir", default="runs/cache")
    p.add_argument("--epochs", type=int, default=WarmStartConfig.epochs)
    p.set_defaults(func=cmd_warmstart)
    p = sub.add_parser("compare", help="compare central and federated DP over a grid of epsilons and seeds")
    p.add_argument("--config", default=None, help="comparison TOML (default: simulations/compare/default.toml)")
    p.add_argument("--output", default=None, help="output folder (overrides compare.output-dir)")
    p.add_argument("--report", action="store_true",
                   help="run nothing: write the tables and plots from the runs finished so far")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("audit", help="the auditor: IDIA with your own targets on every round model a run saved")
    p.add_argument("run_dir", help="the run's output folder (config.json, rounds.csv, models/)")
    p.add_argument("--targets", default=None,
                   help="IDIA: manifest of the attack's targets: 'query' rows of members, 'heldout' rows of non-members")
    p.add_argument("--canaries", default=None,
                   help="the one-run canary audit: the auditor's canary file (canaries.csv: rows and 'included')")
    p.add_argument("--checkpoint", default=None, help="base weights (default: the run's resolved-checkpoint)")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/audit)")
    p.add_argument("--allow-outside-paths", action="store_true", help="target image paths may leave the manifest's folder")
    p.set_defaults(func=cmd_audit)
    p = sub.add_parser("status", help="a run's status.json; exit 0 finished, 1 failed, 3 running or unknown")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("spending", help="a site's privacy spending from its own ledger (writes spending.csv/.md)")
    p.add_argument("state_dir", help="the site's state-dir (node config), holding ledger.sqlite")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--accountant", default="prv")
    p.set_defaults(func=cmd_spending)
    p = sub.add_parser("site-worker", help="a hospital's long-lived worker: keeps model and data in memory across "
                                           "rounds; name its socket in the SuperNode's node config (site-worker)")
    p.add_argument("--site", required=True, help="the site it serves (the node config's 'site')")
    p.add_argument("--socket", required=True, help="Unix socket path (created with mode 0600)")
    p.add_argument("--max-messages", type=int, default=None, help="stop after this many connections (tests)")
    p.set_defaults(func=cmd_site_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"fedclip: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
