"""The ``fedclip`` command as installed: the library's commands (``fedclip.cli``) plus those that
drive the Flower apps, which live here so that ``fedclip/`` never imports ``simulations/``.

    fedclip compare [--config FILE]        central vs federated DP: a matrix of federation runs
    fedclip tune [--config FILE]           private hyperparameter search: the search's cost charged to every site
    fedclip audit RUN_DIR --targets FILE   the auditor: IDIA (and --canaries FILE) on every saved round model
    fedclip site-worker --site S --socket P a hospital's long-lived worker (node config site-worker=P)
    fedclip site-setup --node-config-file F --run-dir D --superlink H:P   a hospital's users and modes
    fedclip site-start worker|supernode|superexec D   start one of a hospital's processes as its user
    fedclip job APP SUPERLINK --run-config F flwr run, then exit by how the run ended (0 finished, 1 failed)
    fedclip consortium-init --manifest M --out D every party's files: coordinator, hospitals, auditor

    python -m simulations.commands ...     the same, without the console script
"""

from __future__ import annotations

import argparse
import sys

from fedclip import cli


def cmd_compare(args: argparse.Namespace) -> int:
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
    paths = write_outputs(config.output_dir, runs, earlier=config.earlier_runs)
    print(paths["markdown"].read_text())
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from simulations.tune.config import DEFAULT_TUNE_TOML, TuneConfig
    from simulations.tune.search import run_search

    try:
        config = TuneConfig.from_toml(args.config or DEFAULT_TUNE_TOML)
        if args.output:
            config = TuneConfig(**{**config.__dict__, "output_dir": args.output})
        out = run_search(config)
    except (ValueError, RuntimeError) as exc:
        print(f"fedclip: error: {exc}", file=sys.stderr)
        return 1
    print((out / "tune.md").read_text())
    print("\n".join(f"{name}: {out / name}" for name in ("tune.md", "selected.json", "candidates.csv")))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from simulations.hospital_clip.audit import audit_run

    out = audit_run(
        args.run_dir,
        targets=args.targets,
        checkpoint=args.checkpoint or "",
        out_dir=args.out,
        allow_outside_paths=args.allow_outside_paths,
        canaries=args.canaries,
    )
    print((out / "summary.md").read_text())
    print(f"audit: {out}")
    return 0


def cmd_site_worker(args: argparse.Namespace) -> int:
    """Serve until stopped; SIGTERM (as from a service manager) removes the socket like Ctrl-C."""
    import signal

    from simulations.hospital_clip.site_worker import serve

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        node_config = None
        if args.node_config is not None:
            from simulations.cli import parse_run_config

            node_config = parse_run_config(args.node_config)
        serve(
            args.socket,
            site=args.site,
            max_messages=args.max_messages,
            on_line=lambda line: print(line, flush=True),
            node_config=node_config,
            allow_users=tuple(args.allow_user),
        )
    except KeyboardInterrupt:
        pass
    return 0


def cmd_site_setup(args: argparse.Namespace) -> int:
    from simulations.site_setup import ROLES, separation_problems, site_setup, start_command

    setup = site_setup(
        node_config_file=args.node_config_file,
        run_dir=args.run_dir,
        superlink=args.superlink,
        node_user=args.node_user,
        app_user=args.app_user,
        owner=args.owner,
        root_certificates=args.root_certificates,
        node_key=args.node_key,
        runtime_port=args.runtime_port,
        create_users=args.create_users,
    )
    print(f"site-setup: {setup.site}: {setup.run_dir}/site.json")
    for role in ROLES:
        user, _, _ = start_command(setup, role)
        print(f"  as root: fedclip site-start {role} {setup.run_dir}   # runs as {user.pw_name}")
    problems = separation_problems(setup)
    for line in problems:
        print(f"  NOT SEPARATED: {line}")
    return 1 if problems else 0


def cmd_site_start(args: argparse.Namespace) -> int:
    from simulations.site_setup import site_start

    site_start(args.run_dir, args.role, check_only=args.check)
    print(f"site-start {args.role}: checks passed")
    return 0


def cmd_consortium_init(args: argparse.Namespace) -> int:
    from simulations.consortium_init import checks, consortium_init

    folders = consortium_init(
        args.manifest,
        args.out,
        base=args.base,
        warm_epochs=args.warm_epochs,
        allow_outside_paths=args.allow_outside_paths,
    )
    print("\n".join(f"{party}: {folder}" for party, folder in folders.items()))
    print("\nbefore the first run:\n" + checks(folders))
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    from simulations.job import main as job

    return job(args.app, args.superlink, run_config=args.run_config, wait=args.wait)


def add_app_commands(sub) -> None:
    """Register ``compare``, ``audit``, ``site-worker`` and ``job`` on the ``fedclip`` parser's subcommands."""
    p = sub.add_parser("compare", help="compare central and federated DP over a grid of epsilons and seeds")
    p.add_argument("--config", default=None, help="comparison TOML (default: simulations/compare/default.toml)")
    p.add_argument("--output", default=None, help="output folder (overrides compare.output-dir)")
    p.add_argument(
        "--report", action="store_true", help="run nothing: write the tables and plots from the runs finished so far"
    )
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("tune", help="private hyperparameter search: a random number of DP runs, the best released")
    p.add_argument("--config", default=None, help="search TOML (default: simulations/tune/default.toml)")
    p.add_argument("--output", default=None, help="output folder (overrides tune.output-dir)")
    p.set_defaults(func=cmd_tune)
    p = sub.add_parser("audit", help="the auditor: IDIA with your own targets on every round model a run saved")
    p.add_argument("run_dir", help="the run's output folder (config.json, rounds.csv, models/)")
    p.add_argument(
        "--targets",
        default=None,
        help="IDIA: manifest of the attack's targets: 'query' rows of members, 'heldout' rows of non-members",
    )
    p.add_argument(
        "--canaries",
        default=None,
        help="the one-run canary audit: the auditor's canary file (canaries.csv: rows and 'included')",
    )
    p.add_argument("--checkpoint", default=None, help="base weights (default: the run's resolved-checkpoint)")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/audit)")
    p.add_argument(
        "--allow-outside-paths", action="store_true", help="target image paths may leave the manifest's folder"
    )
    p.set_defaults(func=cmd_audit)
    p = sub.add_parser(
        "site-worker",
        help="a hospital's long-lived worker: keeps model and data in memory across "
        "rounds; name its socket in the SuperNode's node config (site-worker)",
    )
    p.add_argument("--site", required=True, help="the site it serves (the node config's 'site')")
    p.add_argument("--socket", required=True, help="Unix socket path (created with mode 0600)")
    p.add_argument(
        "--node-config",
        default=None,
        help="the hospital's own node config (\"manifest='...' checkpoint='...' state-dir='...' ...\"): used "
        "for every message instead of the one the ClientApp sends",
    )
    p.add_argument(
        "--allow-user",
        action="append",
        default=[],
        help="an OS user besides this one that may connect (the user the SuperNode runs as)",
    )
    p.add_argument("--max-messages", type=int, default=None, help="stop after this many connections (tests)")
    p.set_defaults(func=cmd_site_worker)
    p = sub.add_parser(
        "site-setup",
        help="as root, once: a hospital's users, file modes and run folder, so that the SuperNode and the "
        "coordinator's ClientApps run as users that cannot read the data (docs/federation.md)",
    )
    p.add_argument("--node-config-file", required=True, help="the hospital's node config (node-config.txt)")
    p.add_argument("--run-dir", required=True, help="a folder for the worker's socket and each user's Flower home")
    p.add_argument("--superlink", required=True, help="the SuperLink's host:port")
    p.add_argument("--node-user", default="fedclip-node", help="the SuperNode's OS user")
    p.add_argument("--app-user", default="fedclip-app", help="the OS user of the SuperExec and every ClientApp")
    p.add_argument("--owner", default=None, help="the data owner, who runs the worker (default: the manifest's)")
    p.add_argument("--root-certificates", default=None, help="the consortium's CA certificate (TLS)")
    p.add_argument("--node-key", default=None, help="this SuperNode's private key (SuperNode authentication)")
    p.add_argument("--runtime-port", type=int, default=9094, help="the SuperNode's runtime API port on 127.0.0.1")
    p.add_argument("--create-users", action="store_true", help="create the node and app users if missing")
    p.set_defaults(func=cmd_site_setup)
    p = sub.add_parser(
        "site-start",
        help="as root: start one of a hospital's processes as its user (the SuperNode only once no "
        "other user can read the data and the worker answers)",
    )
    p.add_argument("role", choices=("worker", "supernode", "superexec"))  # simulations.site_setup.ROLES
    p.add_argument("run_dir", help="the folder site-setup made (site.json)")
    p.add_argument("--check", action="store_true", help="run the checks only")
    p.set_defaults(func=cmd_site_start)
    p = sub.add_parser(
        "job",
        help="the operator's command: flwr run with its log, then exit 0 only if the run finished "
        "(1 failed or stopped, naming the reason; 2 not started; 3 not finished)",
    )
    p.add_argument("app", help="the Flower app's folder (as for flwr run), e.g. .")
    p.add_argument("superlink", help="the SuperLink connection's name in Flower's config (as for flwr run)")
    p.add_argument("--run-config", default="", help="run-config TOML file or overrides (as for flwr run)")
    p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the final status after the log ends")
    p.set_defaults(func=cmd_job)
    p = sub.add_parser(
        "consortium-init",
        help="from one manifest, every party's folder: the coordinator's rows, run config and base weights; "
        "each hospital's rows and node config; the auditor's targets",
    )
    p.add_argument("--manifest", required=True, help="the whole manifest ('train' rows name their site)")
    p.add_argument("--out", required=True, help="a new folder: one subfolder per party")
    p.add_argument("--base", default=None, help="agreed base weights (default: warm start on the public rows)")
    p.add_argument("--warm-epochs", type=int, default=25, help="warm start epochs (without --base)")
    p.add_argument("--allow-outside-paths", action="store_true", help="image paths may leave the manifest's folder")
    p.set_defaults(func=cmd_consortium_init)


def _usage() -> str:
    """Every command's line, the library's and these."""
    lines = [
        line for doc in (cli.__doc__, __doc__) for line in (doc or "").splitlines() if line.startswith("    fedclip ")
    ]
    return "fedclip: federated, differentially private fine-tuning of CLIP, with attacks built in.\n\n" + "\n".join(
        lines
    )


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, extra=(add_app_commands,), description=_usage())


if __name__ == "__main__":
    sys.exit(main())
