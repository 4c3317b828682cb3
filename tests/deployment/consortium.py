"""A consortium's files for the loopback tests: the data split as its parties hold it, the
coordinator's run config and a hospital's node config."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd

from fedclip.data.synthetic import SyntheticConfig, generate
from simulations.loopback import BIN, REPO

DATA = SyntheticConfig(
    seed=3,
    num_sites=2,
    patients_per_site=6,
    public_patients=12,
    heldout_patients=4,
    images_per_patient=4,
    query_images_per_patient=3,
)


def make_consortium(data_dir: Path, parties_dir: Path) -> dict[str, Path]:
    """The data as a consortium holds it, written by ``fedclip consortium-init``: the server's
    folder (public and held-out rows, the base weights), one per hospital (its own members;
    hospital_1's manifest with its site column empty, as a hospital's export would be), the auditor's
    (members' query photos, non-members' photos)."""
    manifest = generate(data_dir, DATA)
    parties = parties_dir / "consortium"
    done = subprocess.run(
        [str(BIN / "fedclip"), "consortium-init", "--manifest", str(manifest), "--out", str(parties)]
        + ["--warm-epochs", "3"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    paths = {"server": parties / "coordinator" / "manifest.csv", "auditor": parties / "auditor" / "manifest.csv"}
    for k in range(2):
        paths[f"hospital_{k}"] = parties / f"hospital_{k}" / "manifest.csv"
    own = pd.read_csv(paths["hospital_1"], keep_default_na=False)
    own.assign(site="").to_csv(paths["hospital_1"], index=False)
    paths["checkpoint"] = parties / "coordinator" / "base.pt"
    return paths


def run_config(path: Path, data: dict[str, Path], *, out: Path, site_nodes: str = "", extra: str = "") -> Path:
    """small.toml for the two hospitals; ``out``: the output folder, one per run (``{run-id}``) unless
    ``extra`` sets ``output-dir``."""
    small = (REPO / "simulations" / "hospital_clip" / "small.toml").read_text().splitlines()
    kept = [line for line in small if not line.startswith(("output-dir", "cache-dir"))]
    output = "" if "output-dir" in extra else f"output-dir = '{out}/{{run-id}}'\n"
    path.write_text(
        "\n".join(kept) + f"\nmanifest = '{data['server']}'\npretrained = '{data['checkpoint']}'\n"
        f"{output}cache-dir = '{out.parent / 'cache'}'\ndeclared-units = 6\n"
        f"sites = 'hospital_0,hospital_1'\nsite-nodes = '{site_nodes}'\n{extra}"
    )
    return path


def site_node_config(name: str, data: dict[str, Path], state: Path, *, worker: Path | None = None) -> str:
    config = (
        f"site='{name}' manifest='{data[name]}' checkpoint='{data['checkpoint']}' state-dir='{state}' declared-units=6"
    )
    return config + (f" site-worker='{worker}'" if worker else "")
