"""Input-level privatization in the federation (dp-mode cadp | maskdp | mask-replace).

Server: ``input_plan`` trains (or finds cached) the public INN and calibrates the one-time release
(``fedclip.privatize.plan``). Site: ``private_rows`` privatizes the site's own training images once,
with its own OS randomness, into its state folder, and says whether it released in this call (then
the site charges the release before returning: ``site_rounds.train``). The copy is written to a
temporary folder and renamed into place, so a site killed mid-way releases again next time, and is
charged again, rather than training on a partial copy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import torch

from fedclip.data.manifest import load_manifest
from fedclip.data.schema import Split
from fedclip.data.tensors import load_images
from fedclip.privacy.policy import PolicyRefusal
from fedclip.privacy.randomness import os_seed
from fedclip.privatize.plan import InputPlan
from simulations.hospital_clip.config import SimulationConfig
from simulations.hospital_clip.site_errors import note_locally

PRIVATE_ROWS = "rows.csv"


def _public_inn(cfg: SimulationConfig, manifest: str) -> str:
    """The CADP network, fitted to the public rows only and cached like the warm start."""
    from fedclip.privatize.inn import ConditionalInn, InnConfig, save_inn, train_inn
    from fedclip.privatize.pixels import to_pixels

    config = InnConfig(image_size=cfg.input_image_size)
    digest = hashlib.sha256(Path(manifest).read_bytes())  # by content, as the warm start: runs on equal data share it
    digest.update(json.dumps([cfg.inn_epochs, cfg.seed, repr(config)]).encode())
    key = digest.hexdigest()[:16]
    path = Path(cfg.cache_dir) / f"inn-{key}.pt"
    if path.is_file():
        return str(path.resolve())
    frame = load_manifest(manifest, allow_outside_paths=cfg.allow_outside_paths).frame
    public = frame[frame["split"] == str(Split.PUBLIC)]
    if public.empty:
        raise ValueError(f"dp-mode 'cadp': {manifest} has no public rows to train the INN on")
    inn = ConditionalInn(config)
    print(f"cadp: training the INN on {len(public)} public images ({cfg.inn_epochs} epochs; cached after)", flush=True)
    train_inn(
        inn,
        load_images(public, preprocess=to_pixels(config.image_size)),
        config.label_indices(public["condition"]),
        epochs=cfg.inn_epochs,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return str(save_inn(inn, path).resolve())


def input_plan(cfg: SimulationConfig, manifest: str) -> InputPlan | None:
    if cfg.dp_mode not in ("cadp", "maskdp", "mask-replace"):
        return None
    inn = _public_inn(cfg, manifest) if cfg.dp_mode == "cadp" else ""
    return InputPlan.calibrated(
        cfg.dp_mode,
        target_epsilon=cfg.target_epsilon,
        delta=cfg.delta,
        images_per_unit=cfg.images_per_unit(),
        radius=cfg.input_radius,
        image_size=cfg.input_image_size,
        inn_checkpoint=inn,
    )


def _privatizer(plan: InputPlan, frame_for_stand_ins: pd.DataFrame | None):
    from fedclip.privatize.maskdp import MaskDpConfig, MaskPrivatizer
    from fedclip.privatize.pixels import to_pixels

    if plan.method == "cadp":
        from fedclip.privatize.cadp import CadpConfig, CadpPrivatizer
        from fedclip.privatize.inn import load_inn

        # target epsilon is only used to calibrate, and the plan brings its noise: any positive value
        return CadpPrivatizer(load_inn(plan.inn_checkpoint), CadpConfig(target_epsilon=1.0), noise=plan.noise)
    if plan.method == "maskdp":
        return MaskPrivatizer(MaskDpConfig(target_epsilon=1.0, radius=plan.radius), noise=plan.noise)
    public = frame_for_stand_ins[frame_for_stand_ins["split"] == str(Split.PUBLIC)]
    return MaskPrivatizer(
        MaskDpConfig(method="replace"), stand_ins=load_images(public, preprocess=to_pixels(plan.image_size))
    )


def _folder(state_dir: Path, plan: InputPlan) -> Path:
    return state_dir / f"privatized-{plan.method}"


def kept_private_rows(state_dir: Path, plan: InputPlan) -> pd.DataFrame | None:
    """The site's privatized training rows from an earlier round, or None if it has not released."""
    folder = _folder(state_dir, plan)
    if not (folder / PRIVATE_ROWS).is_file():
        return None
    kept = pd.read_csv(folder / PRIVATE_ROWS, dtype=str, keep_default_na=False)
    kept["filepath"] = [str(folder / p) for p in kept["filepath"]]
    return kept


def privatize_site_rows(
    rows: pd.DataFrame, *, site: str, plan: InputPlan, unit: str, state_dir: Path, manifest: str, outside_paths: bool
) -> pd.DataFrame:
    """Release the site's training images once (call only after the release is charged).

    A patient with more images than the plan's ``input-images-per-unit`` is refused by the rule's
    name; the count itself (data) is noted in the site's own errors.log, never sent."""
    from fedclip.privatize.dataset import plot_release, privatize_rows

    largest = 1 if unit == "record" else int(rows.groupby("patient_id").size().max())
    if largest > plan.images_per_unit:
        note_locally(
            state_dir,
            f"input-images-per-unit: the largest patient here has {largest} training images, "
            f"more than the plan's {plan.images_per_unit}",
        )
        raise PolicyRefusal(
            site,
            "input-images-per-unit",
            f"a patient at this site has more training images than the plan's "
            f"input-images-per-unit = {plan.images_per_unit}, the number its epsilon is stated for; "
            "refusing to privatize",
        )
    frame = load_manifest(manifest, allow_outside_paths=outside_paths).frame if plan.method == "mask-replace" else None
    folder = _folder(state_dir, plan)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    privatizer = _privatizer(plan, frame)
    out, _, images, private = privatize_rows(
        rows,
        partial,
        privatizer=privatizer,
        image_size=plan.image_size,
        images_per_unit=plan.images_per_unit,
        generator=torch.Generator().manual_seed(os_seed()),
    )
    out.to_csv(partial / PRIVATE_ROWS, index=False)
    # the site's own picture of its release (in a simulation, inside the run folder)
    plot_release(
        partial / "privatization.png",
        rows,
        images,
        {privatizer.name: private},
        title=f"{privatizer.name} at this site: {plan.images_per_unit} images per unit, noise multiplier "
        f"{plan.noise_multiplier:.3g}",
    )
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)  # atomic: a later round finds the whole copy or none
    return kept_private_rows(state_dir, plan)
