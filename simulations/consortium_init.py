"""fedclip consortium-init: every party's files from one manifest, split as a consortium holds them.

From a manifest in open_clip's convention (the generated one, or a user's with a ``site`` column on
its ``train`` rows) it writes one folder per party, each holding only what that party may hold
(docs/federation.md, "Running as a consortium"):

- ``coordinator/``: the public and held-out rows and their images, the base weights, and
  ``consortium.toml``, the run config naming the sites (``site-nodes`` left for the node ids the
  SuperLink gives the registered keys);
- ``<site>/`` for each hospital: its own ``train`` rows and images, the base weights, and
  ``node-config.txt``, the SuperNode's ``--node-config`` (its policy set explicitly, to edit);
- ``auditor/``: the members' query photos and the held-out photos (the attack's targets).

Images are hard-linked when the file system allows it, copied otherwise, so no party's manifest
reaches into another's folder. The base weights are the warm start on the public rows (or
``--base``, a checkpoint the parties agreed on). Everything is checked before anything is written:
the manifest loads, each train row names its site, the output folder is new.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd

from fedclip.data.manifest import load_manifest
from fedclip.data.schema import MANIFEST_COLUMNS, MASK_COLUMN, Split
from fedclip.privacy.policy import DEPLOYED_DEFAULT
from fedclip.training.warmstart import WarmStartConfig, warm_start

COORDINATOR, AUDITOR = "coordinator", "auditor"
# each hospital's to edit: the deployed default's caps written out, and a noise floor the default lacks
POLICY = (
    f"max-epsilon-run={DEPLOYED_DEFAULT.max_epsilon_run} max-epsilon-total={DEPLOYED_DEFAULT.max_epsilon_total} "
    "min-noise-multiplier=0.5"
)


def consortium_init(
    manifest: str | Path,
    out: str | Path,
    *,
    base: str | Path | None = None,
    warm_epochs: int = WarmStartConfig.epochs,
    allow_outside_paths: bool = False,
) -> dict[str, Path]:
    """Write every party's folder under ``out``; ``{party: folder}``."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"--out: {out} is not empty (or is a file); consortium-init writes a new folder and overwrites nothing"
        )
    if base is not None and not Path(base).is_file():
        raise ValueError(f"--base: {base} is not a file")
    loaded = load_manifest(manifest, allow_outside_paths=allow_outside_paths)
    frame = loaded.frame
    train = frame[frame["split"] == str(Split.TRAIN)]
    if train.empty:
        raise ValueError(f"{loaded.source}: no 'train' rows: no hospital has members to train on")
    unnamed = train[train["site"].str.strip() == ""]
    if len(unnamed):
        lines = unnamed["line"].tolist()[:10]
        raise ValueError(
            f"{loaded.source}: column 'site': 'train' rows without a site (lines {lines}); each names its hospital"
        )
    if not (frame["split"] == str(Split.PUBLIC)).any():
        raise ValueError(f"{loaded.source}: no 'public' rows: the coordinator needs them (warm start, evaluation)")
    sites = sorted(train["site"].unique())
    if {COORDINATOR, AUDITOR} & set(sites):
        raise ValueError(f"{loaded.source}: column 'site': {COORDINATOR!r} and {AUDITOR!r} name parties, not hospitals")

    parts = {
        COORDINATOR: frame[frame["split"].isin([str(Split.PUBLIC), str(Split.HELDOUT)])],
        AUDITOR: frame[frame["split"].isin([str(Split.QUERY), str(Split.HELDOUT)])],
        **{site: train[train["site"] == site] for site in sites},
    }
    folders = {party: _write_part(rows, out / party, root=loaded.source.parent) for party, rows in parts.items()}
    checkpoint = folders[COORDINATOR] / "base.pt"
    if base is not None:
        shutil.copyfile(base, checkpoint)
    else:
        found = warm_start(
            folders[COORDINATOR] / "manifest.csv",
            cache_dir=folders[COORDINATOR] / "cache",
            config=WarmStartConfig(epochs=warm_epochs),
        )
        shutil.copyfile(found, checkpoint)
    for party in (AUDITOR, *sites):
        shutil.copyfile(checkpoint, folders[party] / "base.pt")
    units = {site: int(parts[site]["patient_id"].nunique()) for site in sites}
    (folders[COORDINATOR] / "consortium.toml").write_text(_run_config(folders[COORDINATOR], sites, units))
    for site in sites:
        (folders[site] / "node-config.txt").write_text(_node_config(folders[site], site, units[site]) + "\n")
    return folders


def _write_part(rows: pd.DataFrame, folder: Path, *, root: Path) -> Path:
    """``folder/manifest.csv`` with the canonical columns, its images under ``folder/images/``
    (``root``: the source manifest's folder, against which a relative mask path resolves)."""
    folder = folder.resolve()
    (folder / "images").mkdir(parents=True)
    columns = [c for c in (*MANIFEST_COLUMNS, MASK_COLUMN) if c in rows]
    written = rows[columns].copy()
    for column in ("filepath", MASK_COLUMN):
        if column not in written:
            continue
        new = []
        for k, source in enumerate(written[column]):
            if not source:
                new.append(source)
                continue
            name = f"images/{k:06d}-{column}{Path(source).suffix}"
            _link_or_copy(Path(source) if Path(source).is_absolute() else root / source, folder / name)
            new.append(name)
        written[column] = new
    written.to_csv(folder / "manifest.csv", index=False)
    return folder


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed: a copy
        shutil.copyfile(source, target)


def _run_config(folder: Path, sites: list[str], units: dict[str, int]) -> str:
    return (
        "# The coordinator's run config: fedclip job . consortium --run-config consortium.toml\n"
        f'sites = "{",".join(sites)}"\n'
        '# site-nodes = "hospital_a=<node id>,..."  # from `flwr supernode register <site>.pub consortium`\n'
        f"manifest = '{folder / 'manifest.csv'}'    # public and held-out rows only\n"
        f"pretrained = '{folder / 'base.pt'}'       # the base weights every hospital also holds\n"
        f"declared-units = {max(units.values())}    # public units per site: the DP sum's divisor\n"
        f"output-dir = '{folder / 'runs'}/{{run-id}}'\n"
        f"cache-dir = '{folder / 'cache'}'\n"
    )


def _node_config(folder: Path, site: str, units: int) -> str:
    return (
        f"site='{site}' manifest='{folder / 'manifest.csv'}' checkpoint='{folder / 'base.pt'}' "
        f"state-dir='{folder / 'state'}' declared-units={units} {POLICY}"
    )


def checks(folders: dict[str, Path]) -> str:
    """What each party runs before the first job, as printed by the command."""
    lines = [f"coordinator ({folders[COORDINATOR]}):"]
    lines.append(f"  fedclip check-manifest {folders[COORDINATOR] / 'manifest.csv'}   # loads, every image readable")
    lines.append("  flower-superlink --host 0.0.0.0 ... ; flwr supernode register <site>.pub consortium")
    lines.append("  then set site-nodes in consortium.toml and: fedclip job . consortium --run-config consortium.toml")
    for party, folder in folders.items():
        if party in (COORDINATOR, AUDITOR):
            continue
        lines.append(f"{party} ({folder}): review node-config.txt (the policy is yours), then")
        lines.append(f"  fedclip check-manifest {folder / 'manifest.csv'}")
        lines.append(f'  flower-supernode ... --node-config "$(cat {folder / "node-config.txt"})"')
    lines.append(
        f"auditor ({folders[AUDITOR]}): after a run, fedclip audit RUN_DIR --targets {folders[AUDITOR] / 'manifest.csv'}"
    )
    return "\n".join(lines)
