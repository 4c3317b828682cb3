"""A round on Flower's deployment runtime against the same round simulated on Ray.

    python -m benchmarks.deployed_round [--patients 250] [--rounds 3]

Two hospitals of ``--patients`` patients (10 images each), the default private training plan.
The same data and base weights run twice: as a consortium on loopback (SuperLink, two SuperNodes,
``flwr run``; the server holding public and held-out rows only) and through ``flower-simulation``.
Each message on the deployment runtime starts a fresh ClientApp process, so round 1 there pays
for decoding every image (the cache miss) and later rounds read the site's on-disk cache.
Round times come from the ServerApp's own per-round line (time since the first evaluation), so
both runtimes are timed the same way; the table prints their ratio, measured in one run.
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

ROUND_LINE = re.compile(r"round (\d+)/\d+ \|.*\| (\d+)s")


def round_seconds(log: str) -> dict[int, float]:
    """{round: seconds it took}, from the ServerApp's cumulative per-round lines."""
    seen = {int(r): float(t) for r, t in ROUND_LINE.findall(log)}
    return {r: seen[r] - seen[r - 1] for r in sorted(seen) if r - 1 in seen}


def split_roles(manifest: Path) -> dict[str, Path]:
    frame = pd.read_csv(manifest, keep_default_na=False)
    parts = {"server": frame[frame["split"].isin(["public", "heldout"])],
             "auditor": frame[frame["split"].isin(["query", "heldout"])]}
    for site in sorted(set(frame.loc[frame["split"] == "train", "site"])):
        parts[site] = frame[(frame["split"] == "train") & (frame["site"] == site)]
    out = {}
    for role, rows in parts.items():
        out[role] = manifest.with_name(f"{role}.csv")
        rows.to_csv(out[role], index=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=250, help="patients per hospital")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm-epochs", type=int, default=3, help="warm start epochs (timing only: kept short)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fedclip-deployed-"))
    data = SyntheticConfig(num_sites=2, patients_per_site=args.patients, public_patients=200, heldout_patients=100)
    manifest = generate(root / "data", data)
    roles = split_roles(manifest)
    checkpoint = warm_start(roles["server"], cache_dir=root / "cache", config=WarmStartConfig(epochs=args.warm_epochs))
    common = (f"num-rounds = {args.rounds}\npretrained = '{checkpoint}'\ncache-dir = '{root / 'cache'}'\n"
              f"declared-units = {args.patients}\nidia-distractors = 50\n")
    sites = sorted(r for r in roles if r not in ("server", "auditor"))

    print(f"[1/2] deployment: SuperLink and {len(sites)} SuperNodes on loopback", flush=True)
    fed = Federation(root / "federation")
    try:
        fed.superlink()
        for site in sites:
            fed.supernode(site, f"site='{site}' manifest='{roles[site]}' checkpoint='{checkpoint}' "
                                f"state-dir='{root / 'state' / site}' declared-units={args.patients}")
        run_toml = root / "deployed.toml"
        # the auditor's targets on the server, so both runtimes do the same per-round evaluation
        run_toml.write_text(common + f"manifest = '{roles['server']}'\nsites = '{','.join(sites)}'\n"
                                     f"audit-manifest = '{roles['auditor']}'\noutput-dir = '{root / 'deployed'}'\n")
        started = time.time()
        done = fed.run(run_toml, timeout=3600)
        deployed_wall = time.time() - started
    finally:
        fed.stop()
    if done.returncode != 0 or "Traceback" in done.stdout + done.stderr:
        raise SystemExit(f"deployed run failed:\n{(done.stdout + done.stderr)[-3000:]}")
    deployed = round_seconds(done.stdout + done.stderr)

    print("[2/2] simulation: the same data through flower-simulation (Ray)", flush=True)
    sim_toml = root / "simulated.toml"
    sim_toml.write_text(common + f"manifest = '{manifest}'\n")
    started = time.time()
    sim = subprocess.run([str(BIN / "flower-simulation"), "--app", "simulations.hospital_clip", "--run-config",
                          str(sim_toml), "--output", str(root / "simulated")], cwd=REPO, capture_output=True,
                         text=True, timeout=3600, env={**os.environ, "OMP_NUM_THREADS": "1"})  # as the SuperNodes run
    simulated_wall = time.time() - started
    if sim.returncode != 0:
        raise SystemExit(f"simulated run failed:\n{(sim.stdout + sim.stderr)[-3000:]}")
    simulated = round_seconds(sim.stdout + sim.stderr)

    rows = [{"round": r, "deployed (s)": deployed.get(r), "simulated (s)": simulated.get(r),
             "deployed / simulated": deployed[r] / simulated[r] if simulated.get(r) and r in deployed else None}
            for r in sorted(set(deployed) | set(simulated))]
    table = pd.DataFrame(rows)
    print(f"\n{len(sites)} hospitals x {args.patients} patients x {data.images_per_patient} images, "
          f"{args.rounds} rounds (round 1 deployed: cache miss; later rounds: the site's disk cache)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(f"\nwhole run: deployed {deployed_wall:.0f} s, simulated {simulated_wall:.0f} s (each including its own "
          f"start-up, data check and warm-start lookup); folder {root}")


if __name__ == "__main__":
    main()
