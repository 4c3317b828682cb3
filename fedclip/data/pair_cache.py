"""Preprocessed pairs cached on disk, for processes that live one message long.

On Flower's deployment runtime each message starts a fresh ClientApp process, so in-memory
caches never hit and every round decoded and preprocessed all of a site's images again. The
cache file lives in the site's own state folder (its data never leaves the site) and is keyed
by everything that determines its content: each row's image path, size and modification time,
its caption and ids, and the model's preprocessing. A changed image or manifest row gives a new
key, so a stale file is never read.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

from fedclip.data.tensors import PairData, load_pairs

_TEXT_FIELDS = ("patient_ids", "names", "conditions", "record_ids")


def pairs_key(frame: pd.DataFrame, *, model_key: str) -> str:
    """A digest of the rows (image path, size, mtime; caption and ids) and the model's preprocessing."""
    digest = hashlib.sha256(model_key.encode())
    for row in frame[["filepath", "title", "patient_id", "name", "condition"]].itertuples(index=False):
        stat = os.stat(row.filepath) if os.path.exists(row.filepath) else None
        size, mtime = (stat.st_size, stat.st_mtime_ns) if stat else (-1, -1)
        digest.update("\x1f".join(map(str, (*row, size, mtime))).encode() + b"\x1e")
    return digest.hexdigest()[:24]


def cached_pairs(
    frame: pd.DataFrame,
    *,
    cache_dir: str | Path,
    model_key: str,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
) -> PairData:
    """``load_pairs(frame)``, read from ``cache_dir`` if an identical load was saved there."""
    path = Path(cache_dir) / f"pairs-{pairs_key(frame, model_key=model_key)}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return PairData(images=saved["images"], tokens=saved["tokens"], **{k: tuple(saved[k]) for k in _TEXT_FIELDS})
    data = load_pairs(frame, preprocess=preprocess, tokenizer=tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"images": data.images, "tokens": data.tokens, **{k: list(getattr(data, k)) for k in _TEXT_FIELDS}}, tmp)
    tmp.replace(path)  # atomic: a process killed mid-write leaves no half file under the real name
    return data
