"""A round on Flower's deployment runtime against the same round simulated on Ray.

    python -m benchmarks.deployed_round [--patients 250] [--rounds 3] [--sites 2] [--mode distributed]

Two hospitals of ``--patients`` patients (10 images each), the default private training plan.
The same data and base weights run three times: as a consortium on loopback (SuperLink, two
SuperNodes, ``flwr run``; the server holding public and held-out rows only), once with a fresh
ClientApp process answering each message and once with each hospital's ``fedclip site-worker``
answering (the ClientApp only hands the message over), and through ``flower-simulation``.
Without a worker, round 1 pays for decoding every image (the cache miss) and later rounds read
the site's on-disk cache; a worker keeps model and data in memory.
Round times come from the ServerApp's own per-round line (time since the first evaluation), so
both runtimes are timed the same way; the table prints their ratio, measured in one run.

``--mode distributed``: one DP-SGD step per round over Flower's SecAgg+ (each hospital's policy
opts in), four exchanges per round instead of one; the table adds rounds per minute.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd

from fedclip.data.synthetic import SyntheticConfig, generate
from fedclip.training.warmstart import WarmStartConfig, warm_start
from simulations.loopback import BIN, REPO, Federation

DISTRIBUTED = "dp-mode = 'distributed'\nlocal-steps = 1\nbudget = inf\n"  # the round is one step over SecAgg+
ROUND_LINE = re.compile(r"round (\d+)/\d+ \|.*\| (\d+)s")
WORKER_LINE = re.compile(r"train: answered \(run \d+\) in ([0-9.]+) s")


def round_seconds(log: str) -> dict[int, float]:
    """{round: seconds it took}, from the ServerApp's cumulative per-round lines."""
    seen = {int(r): float(t) for r, t in ROUND_LINE.findall(log)}
    return {r: seen[r] - seen[r - 1] for r in sorted(seen) if r - 1 in seen}


def split_roles(manifest: Path) -> dict[str, Path]:
    frame = pd.read_csv(manifest, keep_default_na=False)
    parts = {
        "server": frame[frame["split"].isin(["public", "heldout"])],
        "auditor": frame[frame["split"].isin(["query", "heldout"])],
    }
    for site in sorted(set(frame.loc[frame["split"] == "train", "site"])):
        parts[site] = frame[(frame["split"] == "train") & (frame["site"] == site)]
    out = {}
    for role, rows in parts.items():
        out[role] = manifest.with_name(f"{role}.csv")
        rows.to_csv(out[role], index=False)
    return out


def deployed_run(
    folder: Path,
    roles: dict[str, Path],
    common: str,
    *,
    sites: list[str],
    checkpoint: Path,
    patients: int,
    workers: bool,
    step: str,
    node_extra: str = "",
) -> tuple[dict[int, float], float, list[list[float]]]:
    """One consortium run on loopback: its round times, wall time and (``workers``: each hospital hands
    its messages to a site worker) each worker's seconds per train message, from the worker's log."""
    print(
        f"{step} deployment: SuperLink and {len(sites)} SuperNodes on loopback"
        + (", each with a site worker" if workers else ", a fresh ClientApp process per message"),
        flush=True,
    )
    fed = Federation(folder / "federation")
    worker_logs: list[Path] = []
    try:
        fed.superlink()
        for site in sites:
            state = folder / "state" / site
            node = (
                f"site='{site}' manifest='{roles[site]}' checkpoint='{checkpoint}' state-dir='{state}' "
                f"declared-units={patients}{node_extra}"
            )
            if workers:
                node += f" site-worker='{fed.root / (site + '.sock')}'"
                worker_logs.append(fed.site_worker(site, fed.root / f"{site}.sock"))
            fed.supernode(site, node)
        run_toml = folder / "deployed.toml"
        # the auditor's targets on the server, so both runtimes do the same per-round evaluation
        run_toml.write_text(
            common + f"manifest = '{roles['server']}'\nsites = '{','.join(sites)}'\n"
            f"audit-manifest = '{roles['auditor']}'\noutput-dir = '{folder / 'out'}'\n"
        )
        started = time.time()
        done = fed.run(run_toml, timeout=3600)
        wall = time.time() - started
    finally:
        fed.stop()
    if done.returncode != 0 or "Traceback" in done.stdout + done.stderr:
        raise SystemExit(f"deployed run failed:\n{(done.stdout + done.stderr)[-3000:]}")
    handling = [[float(t) for t in WORKER_LINE.findall(log.read_text())] for log in worker_logs]
    return round_seconds(done.stdout + done.stderr), wall, handling


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=250, help="patients per hospital")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm-epochs", type=int, default=3, help="warm start epochs (timing only: kept short)")
    parser.add_argument("--sites", type=int, default=2, help="hospitals")
    parser.add_argument("--mode", choices=("local", "distributed"), default="local")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fedclip-deployed-"))
    data = SyntheticConfig(
        num_sites=args.sites, patients_per_site=args.patients, public_patients=200, heldout_patients=100
    )
    manifest = generate(root / "data", data)
    roles = split_roles(manifest)
    checkpoint = warm_start(roles["server"], cache_dir=root / "cache", config=WarmStartConfig(epochs=args.warm_epochs))
    common = (
        f"num-rounds = {args.rounds}\npretrained = '{checkpoint}'\ncache-dir = '{root / 'cache'}'\n"
        f"declared-units = {args.patients}\nidia-distractors = 50\n"
    ) + (DISTRIBUTED if args.mode == "distributed" else "")
    node_extra = " allowed-dp-modes='distributed'" if args.mode == "distributed" else ""
    sites = sorted(r for r in roles if r not in ("server", "auditor"))

    deployed, deployed_wall, _ = deployed_run(
        root / "per-message",
        roles,
        common,
        sites=sites,
        checkpoint=checkpoint,
        patients=args.patients,
        workers=False,
        step="[1/3]",
        node_extra=node_extra,
    )
    worker, worker_wall, handling = deployed_run(
        root / "worker",
        roles,
        common,
        sites=sites,
        checkpoint=checkpoint,
        patients=args.patients,
        workers=True,
        step="[2/3]",
        node_extra=node_extra,
    )

    print("[3/3] simulation: the same data through flower-simulation (Ray)", flush=True)
    sim_toml = root / "simulated.toml"
    sim_toml.write_text(common + f"manifest = '{manifest}'\n")
    started = time.time()
    sim = subprocess.run(
        [
            str(BIN / "flower-simulation"),
            "--app",
            "simulations.hospital_clip",
            "--run-config",
            str(sim_toml),
            "--output",
            str(root / "simulated"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=3600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # as the SuperNodes run
    simulated_wall = time.time() - started
    if sim.returncode != 0:
        raise SystemExit(f"simulated run failed:\n{(sim.stdout + sim.stderr)[-3000:]}")
    simulated = round_seconds(sim.stdout + sim.stderr)

    def ratio(times: dict[int, float], r: int) -> float | None:
        return times[r] / simulated[r] if simulated.get(r) and r in times else None

    rows = [
        {
            "round": r,
            "deployed (s)": deployed.get(r),
            "with site worker (s)": worker.get(r),
            "simulated (s)": simulated.get(r),
            "deployed / simulated": ratio(deployed, r),
            "worker / simulated": ratio(worker, r),
        }
        for r in sorted(set(deployed) | set(worker) | set(simulated))
    ]
    table = pd.DataFrame(rows)
    print(
        f"\n{len(sites)} hospitals x {args.patients} patients x {data.images_per_patient} images, "
        f"{args.rounds} rounds (round 1 deployed: cache miss; later rounds: the site's disk cache)"
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    later = [r for r in sorted(simulated) if r > 1]  # round 1 pays for the cache miss
    for name, times in (("deployed", deployed), ("with site workers", worker), ("simulated", simulated)):
        mean = sum(times[r] for r in later if r in times) / max(1, sum(r in times for r in later))
        print(f"rounds per minute after round 1, {name}: {60 / mean:.1f}" if mean else f"{name}: no later rounds")
    print(
        f"\nwhole run: deployed {deployed_wall:.0f} s, with site workers {worker_wall:.0f} s, simulated {simulated_wall:.0f} s (each including its own "
        f"start-up, data check and warm-start lookup); folder {root}"
    )
    for site, times in zip(sites, handling):
        print(
            f"{site}'s worker: seconds per train message (its own handling, rounds 1..): "
            + ", ".join(f"{t:.1f}" for t in times)
        )


if __name__ == "__main__":
    main()
