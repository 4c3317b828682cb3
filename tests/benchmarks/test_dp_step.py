"""The benchmark runs as documented (timings are printed, never asserted: the machine is shared)."""

import os
import subprocess
import sys

import pandas as pd


def test_dp_step_benchmark_runs_and_writes_its_table(tmp_path):
    out = tmp_path / "dp_step.csv"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.dp_step",
        "--ks",
        "2",
        "--trainable",
        "projections",
        "--engines",
        "hooks,ghost",
        "--units",
        "4",
        "--pairs",
        "8",
        "--repeats",
        "1",
        "--csv",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(out)
    assert sorted(zip(table["engine"], table["mode"])) == [
        ("ghost", "microbatch"),
        ("ghost", "unit"),
        ("hooks", "microbatch"),
        ("hooks", "unit"),
    ]
    assert (table["allocator"] == "retain").all() and (table["model"] == "fedclip-tiny").all()
    assert (table["dp_ms"] > 0).all() and (table["ratio"] > 0).all() and (table["trainable_params"] == 8193).all()
    assert (table["plain_live_ms"] > 0).all() and (table["ratio_vs_plain_live"] > 0).all()
