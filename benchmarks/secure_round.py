"""What secure aggregation costs a simulated round: dp-mode distributed (one DP-SGD step per round,
each site's clipped sum with its noise share summed by Flower's SecAgg+) against the same step
with local DP and plain aggregation, at several numbers of sites.

    python -m benchmarks.secure_round [--sites 4,64,256] [--rounds 3] [--patients 4] [--neighbours 15 --threshold 8]
    python -m benchmarks.secure_round --level site --local-steps 10 [...]

``--level site``: the site-level form instead, each site training ``--local-steps`` steps under its
local DP as today, then clipping its whole update; client-level DP's noise added at the server over
plain aggregation against the same noise added in shares and summed by SecAgg+ (``secure-agg``).

Both runs do the same work at a site (one Poisson sample, every unit's gradient clipped and summed;
the plain run adds Gaussian noise and takes its step locally, the distributed run rounds onto the
grid and adds its Skellam share), so the ratio of their rounds is the price of the secure sum:
SecAgg+'s four stages of messages, its key agreement, secret sharing and masks at every site, and
the unmasking at the server. Round time: the server's train phase (``timings.csv``), rounds after
the first (which loads each site's data), mean. Runs through ``benchmarks.many_sites.run_one``
(``flower-simulation``, 2 Ray actors of one CPU); the grid's rounding is 10% of the sensitivity so
that 256 sites' sum fits in the 23 bits Flower's 32-bit SecAgg+ leaves them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd

from benchmarks.many_sites import run_one

ONE_STEP = "local-steps=1 attack-replies=off"
DISTRIBUTED = "dp-mode=distributed secure-agg-rounding=0.1"
SITE_LEVEL = "client-dp-epsilon=1.0 attack-replies=off"  # local DP as the defaults, --local-steps steps
IN_SHARES = "secure-agg=true secure-agg-rounding=0.1"


def _pair(level: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """The plain run's and the secure run's run-config overrides (without the SecAgg+ graph)."""
    if level == "site":
        return ("plain", SITE_LEVEL), ("secagg", f"{SITE_LEVEL} {IN_SHARES}")
    return ("plain", ONE_STEP), ("secagg", f"{ONE_STEP} {DISTRIBUTED}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", default="4,64,256")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--patients", type=int, default=4, help="patients per site")
    parser.add_argument("--neighbours", type=int, default=0, help="SecAgg+ neighbours per site (0: every site)")
    parser.add_argument("--threshold", type=int, default=0, help="reconstruction threshold (0: every site)")
    parser.add_argument("--workdir", default="", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--level", choices=("patient", "site"), default="patient")
    parser.add_argument("--local-steps", type=int, default=10, help="site level: each site's local steps")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fedclip_secure_round_"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in (int(s) for s in args.sites.split(",")):
        runs = {}
        graph = (
            f"secure-agg-neighbours={args.neighbours if args.neighbours < n else 0} "
            f"secure-agg-threshold={min(args.threshold, n) if args.threshold else 0}"
        )
        steps = args.local_steps if args.level == "site" else 1
        for kind, extra in _pair(args.level):
            extra += f" {graph}" if kind == "secagg" else ""
            print(f"{n} sites, {kind} ({args.level} level): running ({workdir})", flush=True)
            runs[kind] = run_one(
                n,
                rounds=args.rounds,
                patients=args.patients,
                steps=steps,
                workdir=workdir,
                extra=extra,
                name=f"_{kind}",
            )
        plain, secagg = _later_rounds(workdir, n, "plain"), _later_rounds(workdir, n, "secagg")
        rows.append(
            {
                "sites": n,
                "plain_round_s": plain,
                "secagg_round_s": secagg,
                "secagg_over_plain": secagg / plain,
                "plain_peak_MiB": runs["plain"]["peak_tree_MiB"],
                "secagg_peak_MiB": runs["secagg"]["peak_tree_MiB"],
            }
        )
        r = rows[-1]
        print(
            f"{n} sites: round {r['plain_round_s']:.1f} s plain, {r['secagg_round_s']:.1f} s over SecAgg+ "
            f"({r['secagg_over_plain']:.2f}x)",
            flush=True,
        )
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 0


def _later_rounds(workdir: Path, sites: int, kind: str) -> float:
    timings = pd.read_csv(workdir / f"sites_{sites}_{kind}" / "timings.csv")
    later = timings[timings["round"] > 1]
    return float(later["train_phase_seconds"].mean())


if __name__ == "__main__":
    sys.exit(main())
