"""A picture of what each input-level mechanism does, drawn from *public* images only.

The gallery privatizes public rows (the warm-start population), never a site's training images:
a picture of privatized private images would itself be a release, outside every ledger.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedclip.data.manifest import load_manifest
from fedclip.data.schema import MASK_COLUMN, Split
from fedclip.data.tensors import load_images
from fedclip.privacy.randomness import os_seed
from fedclip.privatize.cadp import CadpConfig, CadpPrivatizer
from fedclip.privatize.dataset import plot_release
from fedclip.privatize.inn import ConditionalInn
from fedclip.privatize.maskdp import MaskDpConfig, MaskPrivatizer
from fedclip.privatize.pixels import to_pixels


def render_gallery(
    manifest: str | Path,
    out: str | Path,
    *,
    inn: ConditionalInn,
    epsilon: float,
    images_per_unit: int,
    delta: float = 1e-5,
    shown: int = 8,
    allow_outside_paths: bool = False,
) -> Path:
    """Public images: original, mask (if any), CADP, and with masks MaskDP and mask-replace, at
    ``epsilon`` per unit of ``images_per_unit`` images."""
    frame = load_manifest(manifest, allow_outside_paths=allow_outside_paths).frame
    public = frame[frame["split"] == str(Split.PUBLIC)]
    if public.empty:
        raise ValueError(f"manifest: {manifest} has no public rows; the gallery shows public images only")
    rows = public.groupby("patient_id", sort=True).head(1).iloc[:shown]  # one image of each of `shown` people
    size = inn.config.image_size
    images = load_images(rows, preprocess=to_pixels(size))
    generator = torch.Generator().manual_seed(os_seed())
    run = dict(images_per_unit=images_per_unit, generator=generator)
    versions = {
        f"CADP eps {epsilon:g}": CadpPrivatizer(inn, CadpConfig(target_epsilon=epsilon, delta=delta))(
            images, rows, **run
        )[0]
    }
    if MASK_COLUMN in rows and (rows[MASK_COLUMN] != "").all():
        versions[f"MaskDP eps {epsilon:g}"] = MaskPrivatizer(MaskDpConfig(target_epsilon=epsilon, delta=delta))(
            images, rows, **run
        )[0]
        stand_ins = load_images(public.drop(rows.index)[:64], preprocess=to_pixels(size))
        versions["mask-replace"] = MaskPrivatizer(MaskDpConfig(method="replace"), stand_ins=stand_ins)(
            images, rows, **run
        )[0]
    return plot_release(
        Path(out),
        rows,
        images,
        versions,
        shown=shown,
        title=f"Input-level privatization of public images: epsilon {epsilon:g} per patient of "
        f"{images_per_unit} images, delta {delta:g}",
    )
