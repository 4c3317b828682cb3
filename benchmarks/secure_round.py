"""What secure aggregation costs a simulated round: dp-mode distributed (one DP-SGD step per round,
each site's clipped sum with its noise share summed by Flower's SecAgg+) against the same step
with local DP and plain aggregation, at several numbers of sites.

    python -m benchmarks.secure_round [--sites 4,64,256] [--rounds 3] [--patients 4] [--neighbours 15 --threshold 8]

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", default="4,64,256")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--patients", type=int, default=4, help="patients per site")
    parser.add_argument("--neighbours", type=int, default=0, help="SecAgg+ neighbours per site (0: every site)")
    parser.add_argument("--threshold", type=int, default=0, help="reconstruction threshold (0: every site)")
    parser.add_argument("--workdir", default="", help="keep the runs here (default: a temporary folder)")
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
        for kind, extra in (("plain", ONE_STEP), ("secagg", f"{ONE_STEP} {DISTRIBUTED} {graph}")):
            print(f"{n} sites, {kind}: running ({workdir})", flush=True)
            runs[kind] = run_one(
                n, rounds=args.rounds, patients=args.patients, steps=1, workdir=workdir, extra=extra, name=f"_{kind}"
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
