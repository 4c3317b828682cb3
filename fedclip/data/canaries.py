"""Canary patients for the one-run audit: the auditor's secret list of who trained.

A canary is a patient made like any member (training images with reports naming them, and
query images). Each is included in training independently with probability 1/2, decided by a
secret the auditor keeps (32 bytes from the OS, never a config seed): the included canaries'
training rows go into the sites' data, the others' nowhere. After training, the auditor scores
every canary and turns the number of correct guesses into an epsilon lower bound
(``fedclip.attacks.one_run``). The file holds every canary's rows plus ``included`` (0/1), in the
manifest's columns; a user's own canaries in the same form drop in (``canary-file``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedclip.data.schema import MANIFEST_COLUMNS, Split

CANARY_FILE = "canaries.csv"


def draw_inclusion(count: int, *, secret: bytes) -> np.ndarray:
    """``count`` independent fair coins from ``secret`` (at least 16 bytes)."""
    if len(secret) < 16:
        raise ValueError(f"canary secret: expected at least 16 bytes of OS entropy, got {len(secret)}")
    return np.random.default_rng(int.from_bytes(secret, "big")).random(count) < 0.5


@dataclass(frozen=True)
class CanarySet:
    """Every canary's rows (manifest columns and ``included``), read from the auditor's file."""

    frame: pd.DataFrame
    source: str

    @property
    def included(self) -> pd.Series:
        """Per canary patient (sorted by id): did it train?"""
        return self.frame.groupby("patient_id", sort=True)["included"].first().astype(bool)

    def training_rows(self) -> pd.DataFrame:
        """Every canary's training pairs, included or not: what the auditor scores."""
        return self.frame[self.frame["split"] == str(Split.TRAIN)]


def load_canaries(path: str | Path) -> CanarySet:
    """The auditor's canary file, validated: every error names the file and the row or column."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"canary-file: {path} not found")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in (*MANIFEST_COLUMNS, "included") if c not in frame.columns]
    if missing:
        raise ValueError(f"canary-file: {path} lacks column(s) {missing}")
    bad = ~frame["included"].isin(["0", "1"])
    if bad.any():
        line = int(np.argmax(bad.to_numpy())) + 2
        raise ValueError(
            f"canary-file: {path} line {line}: included must be 0 or 1, got {frame['included'][bad].iloc[0]!r}"
        )
    frame["included"] = frame["included"].astype(int)
    mixed = frame.groupby("patient_id")["included"].nunique()
    if (mixed > 1).any():
        raise ValueError(f"canary-file: {path}: patient {mixed[mixed > 1].index[0]!r} is both included and not")
    trained = set(frame.loc[frame["split"] == str(Split.TRAIN), "patient_id"])
    untrained = sorted(set(frame["patient_id"]) - trained)
    if untrained:
        raise ValueError(f"canary-file: {path}: canary {untrained[0]!r} has no 'train' rows to score")
    if len(trained) < 2:
        raise ValueError(f"canary-file: {path}: an audit needs at least 2 canaries, got {len(trained)}")
    frame["line"] = np.arange(len(frame)) + 2  # image errors name the canary file's line
    frame["filepath"] = [
        str((path.parent / p).resolve()) if not Path(p).is_absolute() else p for p in frame["filepath"]
    ]
    return CanarySet(frame=frame, source=str(path))
