"""Many small sites on one machine: wall time, peak memory of the whole process tree, and the share
of a round that is Flower + Ray orchestration rather than the sites' own work.

    python -m benchmarks.many_sites [--sites 4,64,256,1000] [--rounds 2] [--patients 4] [--steps 5]

Each size runs ``flower-simulation`` (the command users run) in its own process tree with 2 Ray
actors (one CPU each). Peak memory: the largest sum of RSS over the process and all its
descendants (Ray's GCS, raylet and workers included), sampled every 0.2 s from /proc.
Orchestration share of a round: 1 - (sum of the sites' own handling time / actors + the strategy's
own time) / the server's train phase, from the run's ``timings.csv`` (server) and each site's
``site_timings.csv`` (written by the site in its own folder). The sites' handling includes their
ledger, data loading, model set-up, local DP steps and spending report; the strategy's time its
budget checks, charges, settlements, aggregation and report (fedclip's work, shown as its own
column); orchestration is everything else: Flower's messages, Ray's scheduling, (de)serialisation,
and actors left idle at the end of a round. CPU time per process name (user + system, from /proc,
the last sample of each process): with 2 cores and 2 actors, CPU the driver and Ray's daemons use
while sites train is taken from the sites, so it shows up as slower sites rather than as
orchestration in the share above; ``cpu_share_outside_sites`` is the share of the whole tree's CPU
time not spent in the actors (it also counts the driver's data preparation, warm start and attacks).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ACTORS = 2
SITE_WORKER = "ray::ClientAppA"  # the Ray actors' process name (truncated by the kernel), where sites run


def _tree_sample(root: int) -> tuple[float, dict[str, float], dict[int, tuple[str, int]]]:
    """Total RSS (MiB) of ``root`` and its descendants, the RSS per process name, and each
    process's CPU time so far ({pid: (name, clock ticks of user + system time)})."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    names: dict[int, str] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # fields[0] is the state, field 3 of the stat line
        ppid = int(fields[1])
        names[int(entry)] = stat.split("(", 1)[1].rsplit(")", 1)[0]
        ticks[int(entry)] = int(fields[11]) + int(fields[12])  # utime + stime (stat fields 14 and 15)
        children.setdefault(ppid, []).append(int(entry))
        rss[int(entry)] = _vmrss_kib(status)
    total, stack, by_name, cpu = 0, [root], {}, {}
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        by_name[names.get(pid, "?")] = by_name.get(names.get(pid, "?"), 0) + rss.get(pid, 0) / 1024
        if pid in ticks:
            cpu[pid] = (names[pid], ticks[pid])
        stack.extend(children.get(pid, []))
    return total / 1024, by_name, cpu


def _vmrss_kib(status: str) -> int:
    """Resident memory (KiB) from a /proc/<pid>/status text (0 for a kernel thread, which has none)."""
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)


def _rss_mib(pid: int) -> float:
    """One process's resident memory (MiB), 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return _vmrss_kib(status) / 1024


def _cpu_by_name(seen: dict[int, tuple[str, int]]) -> dict[str, float]:
    """CPU seconds per process name, from the last sample of every process seen."""
    out: dict[str, float] = {}
    for name, ticks in seen.values():
        out[name] = out.get(name, 0.0) + ticks / os.sysconf("SC_CLK_TCK")
    return out


def run_one(
    sites: int,
    *,
    rounds: int,
    patients: int,
    steps: int,
    workdir: Path,
    in_flight: int = 8,
    extra: str = "",
    name: str = "",
) -> dict:
    """One ``flower-simulation`` of ``sites`` sites; ``extra`` run-config overrides, ``name`` its folder's suffix."""
    out = workdir / f"sites_{sites}{name}"
    config = (
        f"num-sites={sites} patients-per-site={patients} public-patients=40 heldout-patients=12 "
        f"images-per-patient=2 query-images-per-patient=1 idia-queries=1 idia-distractors=20 lira=false attack-replies=off "
        f"warm-start-epochs=3 local-steps={steps} negative-bank-size=32 num-rounds={rounds} "
        f"microbatch-size=1 target-epsilon=0.0 noise-multiplier=1.0 budget=inf cache-dir='{workdir / 'cache'}' "
        f"messages-in-flight={in_flight} {extra}"
    )
    cmd = [
        sys.executable,
        "-m",
        "simulations.cli",
        "--app",
        "simulations.hospital_clip",
        "--output",
        str(out),
        "--run-config",
        config,
        "--backend-config",
        '{"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}',
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEDCLIP_PROGRESS": "0"}
    started = time.time()
    log = (workdir / f"sites_{sites}{name}.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    peak, at_peak, timeline, cpu_seen, driver_peak = 0.0, {}, [], {}, 0.0
    while proc.poll() is None:
        driver_peak = max(driver_peak, _rss_mib(proc.pid))  # the driver: ServerApp, Flower's engine, the attacks
        total, by_name, cpu = _tree_sample(proc.pid)
        cpu_seen.update(cpu)
        timeline.append((time.time() - started, total))
        if total > peak:
            peak, at_peak = total, by_name
        time.sleep(0.2)
    wall = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{sites} sites: flower-simulation exited {proc.returncode}; see {log.name}")
    cpu_s = _cpu_by_name(cpu_seen)
    server = pd.read_csv(out / "timings.csv")
    site_rows = pd.concat([pd.read_csv(p) for p in (out / "sites").glob("*/site_timings.csv")])
    trained = server[server["round"] > 0]
    per_round = site_rows.groupby("round")[["handle_seconds", "train_seconds"]].sum()
    train_phase = trained.set_index("round")["train_phase_seconds"]
    strategy = trained.set_index("round")["strategy_seconds"]
    share = 1 - (per_round["handle_seconds"] / ACTORS + strategy) / train_phase
    return {
        "sites": sites,
        "in_flight": in_flight,
        "wall_s": wall,
        "peak_tree_MiB": peak,
        "driver_peak_MiB": driver_peak,
        "round_s": float(train_phase.mean()),
        "strategy_s": float(strategy.mean()),
        "evaluate_s": float(trained["evaluate_seconds"].mean()),
        "site_handle_s": float(site_rows["handle_seconds"].mean()),
        "site_train_s": float(site_rows["train_seconds"].mean()),
        "orchestration_share": float(share.mean()),
        "orchestration_share_last_round": float(share.iloc[-1]),
        "site_messages": len(site_rows),
        "peak_by_process": ", ".join(f"{k} {v:.0f}" for k, v in sorted(at_peak.items(), key=lambda kv: -kv[1])[:4]),
        "peak_at_s": max(timeline, key=lambda tv: tv[1])[0] if timeline else 0.0,
        "cpu_s_by_process": ", ".join(f"{k} {v:.0f}" for k, v in sorted(cpu_s.items(), key=lambda kv: -kv[1])[:5]),
        "cpu_share_outside_sites": 1 - cpu_s.get(SITE_WORKER, 0.0) / max(sum(cpu_s.values()), 1e-9),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", default="4,64,256,1000")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--patients", type=int, default=4, help="patients per site")
    parser.add_argument("--steps", type=int, default=5, help="local DP steps per site and round")
    parser.add_argument("--in-flight", type=int, default=8, help="messages-in-flight (0: all of a round at once)")
    parser.add_argument("--workdir", default="", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--csv", default="", help="also write the table here")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fedclip_many_sites_"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in (int(s) for s in args.sites.split(",")):
        print(f"{n} sites: running ({workdir})", flush=True)
        rows.append(
            run_one(
                n,
                rounds=args.rounds,
                patients=args.patients,
                steps=args.steps,
                workdir=workdir,
                in_flight=args.in_flight,
            )
        )
        r = rows[-1]
        print(
            f"{n} sites: wall {r['wall_s']:.0f} s, round {r['round_s']:.1f} s (strategy {r['strategy_s']:.1f} s), "
            f"peak {r['peak_tree_MiB']:.0f} MiB (driver {r['driver_peak_MiB']:.0f}), orchestration {100 * r['orchestration_share']:.1f}% of a round",
            flush=True,
        )
    table = pd.DataFrame(rows)
    if args.csv:
        table.to_csv(args.csv, index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
