"""Privatize a manifest's training images once, on disk, and say what the release guarantees.

Writes ``OUT/manifest.csv`` (every row of the input; training rows point at privatized images,
every other row at a copy of its original), ``OUT/privatization.json`` (method, noise, the unit's
epsilon and the statement of what it covers) and ``OUT/privatization.png`` (originals above their
privatized versions). A site runs it on its own manifest; a simulation on the generated data.
Training on ``OUT/manifest.csv`` is post-processing of the release.

A privatizer is a callable ``(images, rows, *, images_per_unit, generator) -> (images, report)``
(``fedclip.privatize.cadp.CadpPrivatizer``, ``fedclip.privatize.maskdp.MaskPrivatizer``); the
report carries its epsilon (or None) and a statement with ``{unit}``/``{units}`` to fill in.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from fedclip.data.manifest import load_manifest
from fedclip.data.schema import MANIFEST_COLUMNS, MASK_COLUMN, Split
from fedclip.data.tensors import load_images
from fedclip.privacy.events import PrivacyUnit
from fedclip.privacy.randomness import NOT_PRIVATE_AGAINST_THE_SERVER, os_seed
from fedclip.privatize.pixels import save_png, to_pixels
from fedclip.reporting.plots import plot_image_grid

PRIVATIZATION_FILE = "privatization.json"
Privatizer = Callable[..., tuple[torch.Tensor, dict]]


def images_per_unit(train: pd.DataFrame, unit: PrivacyUnit | str) -> int:
    """The largest number of training images of one unit: the guarantee is stated for it, and a
    unit with fewer images is protected at least as well."""
    return 1 if PrivacyUnit(unit) == PrivacyUnit.RECORD else int(train.groupby("patient_id").size().max())


def _copy(src: str, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def privatize_rows(
    train: pd.DataFrame,
    out_dir: Path,
    *,
    privatizer: Privatizer,
    image_size: int,
    images_per_unit: int,
    generator: torch.Generator,
) -> tuple[pd.DataFrame, dict, torch.Tensor, torch.Tensor]:
    """Privatize ``train``'s images into ``out_dir/images``; return the rows pointing at them
    (relative paths), the privatizer's report, and the original and privatized pixels."""
    if images_per_unit < 1:
        raise ValueError(f"images per unit: expected >= 1, got {images_per_unit}")
    images = load_images(train, preprocess=to_pixels(image_size))
    private, report = privatizer(images, train, images_per_unit=images_per_unit, generator=generator)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rows = train.copy()
    for i, index in enumerate(train.index):
        rows.loc[index, "filepath"] = rel = f"images/private_{i:06d}.png"
        save_png(private[i], out_dir / rel)
    return rows, report, images, private


def privatize_manifest(
    manifest: str | Path,
    out_dir: str | Path,
    *,
    privatizer: Privatizer,
    image_size: int,
    privacy_unit: PrivacyUnit | str = PrivacyUnit.IDENTITY,
    allow_outside_paths: bool = False,
    reproducible_seed: int | None = None,
) -> Path:
    """Privatize every ``train`` row's image; return the new manifest's path.
    ``reproducible_seed`` (experiments only) replaces the OS seed and is NOT private."""
    unit = PrivacyUnit(privacy_unit)
    out = Path(out_dir)
    if (out / "manifest.csv").exists():
        raise ValueError(f"out: {out} already holds a privatized manifest; a second release would spend again")
    frame = load_manifest(manifest, allow_outside_paths=allow_outside_paths).frame
    train = frame[frame["split"] == str(Split.TRAIN)]
    if train.empty:
        raise ValueError(f"manifest: {manifest} has no 'train' rows to privatize")
    if reproducible_seed is not None:
        print(f"WARNING: {NOT_PRIVATE_AGAINST_THE_SERVER}", flush=True)
    k = images_per_unit(train, unit)
    generator = torch.Generator().manual_seed(os_seed() if reproducible_seed is None else reproducible_seed)
    columns = list(MANIFEST_COLUMNS) + ([MASK_COLUMN] if MASK_COLUMN in frame else [])
    rows = frame[columns].copy()
    private_rows, report, images, private = privatize_rows(
        train, out, privatizer=privatizer, image_size=image_size, images_per_unit=k, generator=generator
    )
    rows.loc[train.index, "filepath"] = private_rows["filepath"]
    for index in frame.index.difference(train.index):
        rows.loc[index, "filepath"] = rel = f"images/{index:06d}{Path(frame.loc[index, 'filepath']).suffix}"
        _copy(frame.loc[index, "filepath"], out / rel)
    if MASK_COLUMN in rows:
        for index in frame.index[frame[MASK_COLUMN] != ""]:
            rows.loc[index, MASK_COLUMN] = rel = f"images/{index:06d}_mask.png"
            _copy(frame.loc[index, MASK_COLUMN], out / rel)
    rows.to_csv(out / "manifest.csv", index=False)
    names = ("patient", "patients") if unit == PrivacyUnit.IDENTITY else ("record", "records")
    report = {
        "method": privatizer.name,
        **report,
        "privacy_unit": str(unit),
        "images_per_unit": k,
        "relation": "replace_one (local)",
        "images": len(train),
        "reproducible_seed": reproducible_seed,
        "statement": report["statement"].format(unit=names[0], units=names[1]),
    }
    (out / PRIVATIZATION_FILE).write_text(json.dumps(report, indent=2) + "\n")
    eps = (
        "no epsilon (anonymization)" if report["epsilon"] is None else f"epsilon {report['epsilon']:.2f} per {names[0]}"
    )
    plot_release(
        out / "privatization.png",
        train,
        images,
        {privatizer.name: private},
        title=f"{privatizer.name}: {eps} ({k} images)",
    )
    return out / "manifest.csv"


def plot_release(
    path: Path,
    rows: pd.DataFrame,
    images: torch.Tensor,
    versions: dict[str, torch.Tensor],
    *,
    title: str,
    shown: int = 8,
) -> Path:
    """Originals, their masks (if the rows have them) and each privatized version, side by side."""
    from fedclip.privatize.maskdp import load_masks

    shown = min(shown, len(rows))
    grid = {"original": images[:shown]}
    if MASK_COLUMN in rows and (rows[MASK_COLUMN][:shown] != "").all():
        grid["mask"] = load_masks(rows[:shown], size=images.shape[-1]).float()[:, None].expand(-1, 3, -1, -1)
    grid.update({name: v[:shown] for name, v in versions.items()})
    return plot_image_grid(path, grid, captions=list(rows["condition"][:shown]), title=title)
