"""Canary patients for a consortium's own data: the auditor makes them, each hospital adds its share.

With real data the auditor cannot plant canaries by regenerating the data, so it renders synthetic
canary patients (images drawn like the embedded data's, reports naming each canary) and hands
each hospital only the included canaries placed at that hospital:

    OUT/canaries.csv, OUT/canaries.csv.secret   the auditor's: every canary and who trained (keep)
    OUT/sites/<site>/canary_rows.csv            the hospital's: rows to append to its manifest
    OUT/sites/<site>/canaries/images/...        their images, paths relative to that folder

A hospital copies ``OUT/sites/<site>/``'s contents next to its manifest and appends the rows; the
run (``canary-file``) or ``fedclip audit --canaries`` gets ``OUT/canaries.csv``. Synthetic canaries
are out of distribution for real images, which makes them easier to detect: the audit is more
powerful and still valid, since inclusion is a fair coin from the OS whatever a canary looks like.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fedclip.data.canaries import CANARY_FILE
from fedclip.data.manifest import load_manifest
from fedclip.data.schema import MANIFEST_COLUMNS, Split
from fedclip.data.synthetic import SyntheticConfig, canary_patients

SITE_ROWS = "canary_rows.csv"


def make_site_canaries(
    out_dir: str | Path,
    *,
    sites: list[str],
    count: int,
    images_per_canary: int = 4,
    query_images: int = 3,
    image_size: int = 224,
    name_lists: str = "census",
    exclude_manifest: str | Path | None = None,
    secret: bytes | None = None,
) -> Path:
    """Write the auditor's canary file and every site's share under ``out_dir``; return the canary file.
    ``exclude_manifest``: the auditor's target manifest, whose names no canary may take."""
    names = [s.strip() for s in sites if s.strip()]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"sites: expected distinct site names, got {sites}")
    if count < 2:
        raise ValueError(f"count: an audit needs at least 2 canaries, got {count}")
    out = Path(out_dir)
    if (out / CANARY_FILE).exists():
        raise ValueError(f"out: {out / CANARY_FILE} exists; a second draw would replace the auditor's secret")
    exclude = set(load_manifest(exclude_manifest).frame["name"]) if exclude_manifest else set()
    # the look of the canaries may be seeded (it is no secret); who trains comes from `secret` or the OS
    config = SyntheticConfig(
        images_per_patient=images_per_canary,
        query_images_per_patient=query_images,
        image_size=image_size,
        name_lists=name_lists,
    )
    canaries = canary_patients(out, count=count, sites=names, config=config, exclude_names=exclude, secret=secret)
    trained = canaries[(canaries["included"] == 1) & (canaries["split"] == str(Split.TRAIN))]
    for site in names:
        folder = out / "sites" / site
        (folder / "canaries" / "images").mkdir(parents=True, exist_ok=True)
        rows = trained[trained["site"] == site][list(MANIFEST_COLUMNS)].copy()
        for path in rows["filepath"]:
            shutil.copyfile(out / path, folder / "canaries" / path)
        rows["filepath"] = "canaries/" + rows["filepath"]
        rows.to_csv(folder / SITE_ROWS, index=False)
    return out / CANARY_FILE
