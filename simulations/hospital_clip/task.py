"""What the server and the clients of the hospital federation share: data, model and partitions.

In a simulation every SuperNode is on this machine and reads its own site's rows of the same
manifest; in a deployment a SuperNode's ``--node-config "manifest='...' site='...'"`` points at
its own data. Either way the rows never leave the node: only model updates, the example count,
the training loss and the privacy event do.
"""

from __future__ import annotations

import copy
import os
from functools import lru_cache
from pathlib import Path

import torch

from fedclip.data.manifest import load_manifest
from fedclip.data.pair_cache import cached_pairs
from fedclip.data.partition import assign_sites_by_patient, partition_by_site
from fedclip.data.schema import Split
from fedclip.data.tensors import PairData, load_pairs
from fedclip.models.factory import ClipBundle, ModelConfig, create_model


def pick_device() -> torch.device:
    """The GPU that Ray (or the machine) gives this process, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


POOLED_SITE = "pooled"


@lru_cache(maxsize=4)
def site_frames(manifest: str, num_sites: int, seed: int, pooled: bool = False, outside_paths: bool = False) -> dict:
    """Member rows per site: by the manifest's site column, or split by patient if it has none;
    ``pooled``: one site holding every member (central training on pooled data);
    ``outside_paths``: image paths may leave the manifest's folder."""
    frame = load_manifest(manifest, allow_outside_paths=outside_paths).frame
    members = frame[frame["split"] == str(Split.TRAIN)]
    if pooled:
        frame = assign_sites_by_patient(frame, num_sites=1, seed=seed)
        frame["site"] = frame["site"].replace("site_0", POOLED_SITE)
    elif (members["site"].str.strip() == "").all():
        frame = assign_sites_by_patient(frame, num_sites=num_sites, seed=seed)
    return partition_by_site(frame)


def file_stamp(path: str) -> tuple[int, int] | None:
    """(mtime, size) of a file, None if it is not one: a process that lives for days (a site's
    worker) must see a replaced checkpoint or manifest, not its cached copy."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


@lru_cache(maxsize=4)
def _bundle(arch: str, checkpoint: str, trainable: str, _stamp: tuple[int, int] | None) -> ClipBundle:
    return create_model(ModelConfig(arch=arch, pretrained=checkpoint, trainable=trainable))


def base_bundle(arch: str, checkpoint: str, trainable: str) -> ClipBundle:
    return _bundle(arch, checkpoint, trainable, file_stamp(checkpoint))


def fresh_model(arch: str, checkpoint: str, trainable: str, device: torch.device) -> torch.nn.Module:
    """A copy of the base model (the global model's frozen part), on ``device``; the checkpoint
    is read once per process, not once per round."""
    return copy.deepcopy(base_bundle(arch, checkpoint, trainable).model).to(device)


def site_training_rows(
    manifest: str, site: str, num_sites: int, seed: int, pooled: bool = False, outside_paths: bool = False
):
    """A site's ``train`` rows (query images are never trained on)."""
    parts = site_frames(manifest, num_sites, seed, pooled, outside_paths)
    if site not in parts:
        raise ValueError(f"site: {site!r} is not in {manifest} (sites: {sorted(parts)})")
    rows = parts[site]
    return rows[rows["split"] == str(Split.TRAIN)]


@lru_cache(maxsize=8)
def site_training_data(
    manifest: str,
    site: str,
    num_sites: int,
    seed: int,
    arch: str,
    checkpoint: str,
    pooled: bool = False,
    outside_paths: bool = False,
) -> PairData:
    """A site's training pairs."""
    rows = site_training_rows(manifest, site, num_sites, seed, pooled, outside_paths)
    bundle = base_bundle(arch, checkpoint, "all")
    return load_pairs(rows, preprocess=bundle.preprocess, tokenizer=bundle.tokenizer)


def rows_training_data(rows, *, arch: str, checkpoint: str) -> PairData:
    """Training pairs from rows of any origin (a site's privatized images), kept in memory by their files."""
    return _rows_pairs(
        tuple(rows["filepath"]),
        tuple(rows["title"]),
        tuple(rows["patient_id"]),
        tuple(rows["name"]),
        tuple(rows["condition"]),
        arch,
        checkpoint,
    )


@lru_cache(maxsize=4)
def _rows_pairs(
    paths: tuple, titles: tuple, patients: tuple, names: tuple, conditions: tuple, arch: str, checkpoint: str
) -> PairData:
    import pandas as pd

    rows = pd.DataFrame(
        {"filepath": paths, "title": titles, "patient_id": patients, "name": names, "condition": conditions}
    )
    bundle = base_bundle(arch, checkpoint, "all")
    return load_pairs(rows, preprocess=bundle.preprocess, tokenizer=bundle.tokenizer)


def own_training_data(
    manifest: str, site: str, *, arch: str, checkpoint: str, cache_dir: Path, outside_paths: bool = False
) -> PairData:
    """A deployed site's training pairs, from its own manifest: the ``train`` rows of its site (or
    every ``train`` row if the manifest has no site column: a hospital's manifest is its own).

    Preprocessed once and cached on disk in the site's state folder: each message starts a fresh
    ClientApp process on the deployment runtime, so an in-memory cache would never hit."""
    frame = load_manifest(manifest, allow_outside_paths=outside_paths).frame
    rows = frame[frame["split"] == str(Split.TRAIN)]
    named = rows["site"].str.strip() != ""
    if named.any():
        rows = rows[rows["site"] == site]
        if rows.empty:
            raise ValueError(
                f"site: {manifest} has no 'train' rows for site {site!r} "
                f"(its sites: {sorted(set(frame.loc[frame['site'] != '', 'site']))})"
            )
    if rows.empty:
        raise ValueError(f"manifest: {manifest} has no 'train' rows to train on")
    return _pairs(rows, arch=arch, checkpoint=checkpoint, cache_dir=cache_dir)


def _pairs(rows, *, arch: str, checkpoint: str, cache_dir: Path | None) -> PairData:
    """Rows as tensors with the base model's preprocessing; kept on disk in ``cache_dir`` if given."""
    bundle = base_bundle(arch, checkpoint, "all")
    if cache_dir is None:
        return load_pairs(rows, preprocess=bundle.preprocess, tokenizer=bundle.tokenizer)
    return cached_pairs(
        rows,
        cache_dir=cache_dir,
        model_key=f"{arch}|{bundle.preprocess!r}",
        preprocess=bundle.preprocess,
        tokenizer=bundle.tokenizer,
    )


def site_public_data(
    manifest: str, arch: str, checkpoint: str, outside_paths: bool = False, cache_dir: Path | None = None
) -> PairData:
    """The public population's pairs (the negative bank of unit mode): public by construction.
    ``cache_dir``: keep them preprocessed on disk there (a deployed site's state folder)."""
    return _public_pairs(manifest, arch, checkpoint, outside_paths, cache_dir, file_stamp(manifest))


@lru_cache(maxsize=4)
def _public_pairs(
    manifest: str,
    arch: str,
    checkpoint: str,
    outside_paths: bool,
    cache_dir: Path | None,
    _stamp: tuple[int, int] | None,
) -> PairData:
    frame = load_manifest(manifest, allow_outside_paths=outside_paths).frame
    rows = frame[frame["split"] == str(Split.PUBLIC)]
    if rows.empty:
        raise ValueError(f"dp-mode 'unit': {manifest} has no public rows to draw negatives from")
    return _pairs(rows, arch=arch, checkpoint=checkpoint, cache_dir=cache_dir)


def site_for_partition(
    manifest: str, num_sites: int, seed: int, partition_id: int, pooled: bool = False, outside_paths: bool = False
) -> str:
    sites = sorted(site_frames(manifest, num_sites, seed, pooled, outside_paths))
    if not 0 <= partition_id < len(sites):
        raise ValueError(
            f"partition-id: {partition_id} but the manifest has {len(sites)} sites {sites}; "
            "run as many SuperNodes as sites"
        )
    return sites[partition_id]


def manifest_path(value: str) -> str:
    return str(Path(value).resolve())
