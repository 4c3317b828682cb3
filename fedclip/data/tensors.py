"""Turn manifest rows into the tensors training and evaluation use.

The toy data and a site's partition fit in memory, so images are decoded and preprocessed once
and kept as one tensor; training then samples indices, never touching the disk again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from fedclip.data.manifest import ManifestError


@dataclass(frozen=True)
class PairData:
    """Preprocessed image-caption pairs with the ids that privacy and attacks need."""

    images: torch.Tensor
    tokens: torch.Tensor
    patient_ids: tuple[str, ...]
    names: tuple[str, ...]
    conditions: tuple[str, ...]
    record_ids: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: torch.Tensor | list[int]) -> "PairData":
        idx = torch.as_tensor(index, dtype=torch.long)
        pick = idx.tolist()
        return PairData(
            images=self.images[idx],
            tokens=self.tokens[idx],
            patient_ids=tuple(self.patient_ids[i] for i in pick),
            names=tuple(self.names[i] for i in pick),
            conditions=tuple(self.conditions[i] for i in pick),
            record_ids=tuple(self.record_ids[i] for i in pick),
        )


def load_images(frame: pd.DataFrame, *, preprocess: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """Decode and preprocess every row's image; a failure names the file and its manifest line."""
    images = []
    for path, line in zip(frame["filepath"], frame.get("line", pd.Series([None] * len(frame)))):
        try:
            with Image.open(path) as img:
                images.append(preprocess(img.convert("RGB")))
        except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
            where = f" (manifest line {line})" if line is not None else ""
            rows = ((int(line), "filepath", "unreadable image"),) if line is not None else ()
            raise ManifestError(f"filepath: cannot read image {path}{where}: {exc}", rows=rows) from exc
    return torch.stack(images)


def load_pairs(
    frame: pd.DataFrame,
    *,
    preprocess: Callable[[Image.Image], torch.Tensor],
    tokenizer: Callable[[list[str]], torch.Tensor],
) -> PairData:
    """Decode, preprocess and tokenize every row of ``frame`` (canonical manifest columns)."""
    if frame.empty:
        raise ValueError("frame: no rows to load")
    return PairData(
        images=load_images(frame, preprocess=preprocess),
        tokens=tokenizer(list(frame["title"])),
        patient_ids=tuple(frame["patient_id"]),
        names=tuple(frame["name"]),
        conditions=tuple(frame["condition"]),
        record_ids=tuple(frame["filepath"]),
    )
