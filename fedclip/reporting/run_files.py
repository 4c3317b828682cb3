"""A run folder's tables: CSVs appended row by row, so a crash keeps what was measured."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

TABLES: dict[str, tuple[str, ...]] = {
    "rounds": (
        "round",
        "site",
        "status",
        "epsilon",
        "delta",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "privacy_unit",
        "relation",
        "train_loss",
        "selected",
        "budget",
        "reason",
        "neighbours",  # what the epsilon is about (fedclip.privacy.guarantee)
        "covers",
    ),
    "attack": (
        "round",
        "attack",
        "tpr",
        "fpr",
        "precision",
        "recall",
        "accuracy",
        "epsilon_lower_bound",
        "max_site_epsilon",
        "members",
        "non_members",
        "auc",
        "tpr_at_1pct_fpr",
        "tpr_at_0.1pct_fpr",
        "audited_epsilon",
        "audit_guesses",
        "audit_correct",
        "gaussian_epsilon",  # white-box canaries: the Gaussian-pair audit's certified bound (under its model)
        "gaussian_epsilon_95",  # the same at 95% alone: valid for one row named in advance (the final round)
        "gaussian_epsilon_estimate",
        "gaussian_mu",
        "normality_p",
        "audit_confidence",  # of every certified bound in the row: joint over the run's rounds and audits
        "comparable_to_epsilon",  # False: the sites' epsilon is not about membership (input level)
    ),
    "attack_sites": ("round", "attack", "site", "members", "tpr", "fpr"),
    "attack_scores": ("round", "attack", "target", "site", "is_member", "score"),  # for ROC curves
    # validation: the server's validation patients (validation-patients > 0), apart from the test set
    "utility": ("round", "zero_shot_accuracy", "recall_at_1", "recall_at_5", "validation_zero_shot_accuracy"),
    # where a round's time goes: the train phase (from sending to aggregating: every site, Flower and
    # Ray, and the strategy's own work, also given alone) and the server's evaluation
    "timings": ("round", "train_phase_seconds", "strategy_seconds", "evaluate_seconds"),
    # a site's own, in its state folder (never sent): handling one train message, and its local steps
    "site_timings": ("round", "handle_seconds", "train_seconds"),
    # a site's own: each round its policy refused (nothing charged), with the rule (spending.md shows them)
    "site_refusals": ("round", "run", "at", "rule", "reason"),
}


class RunFiles:
    def __init__(self, out_dir: str | Path) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._current: set[str] = set()  # tables whose header this process has checked or written

    def path(self, table: str) -> Path:
        return self.dir / f"{table}.csv"

    def append(self, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
        columns = TABLES[table]
        path = self.path(table)
        new = not path.exists()
        if not new and table not in self._current:  # once per process: a resumed run's older table
            self._upgrade(path, columns)
        self._current.add(table)
        with path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="raise")
            if new:
                writer.writeheader()
            for row in rows:
                writer.writerow({c: row[c] for c in columns})
            handle.flush()

    @staticmethod
    def _upgrade(path: Path, columns: tuple[str, ...]) -> None:
        """A table written by an older version (a resumed run): its rows under today's columns, the
        new ones empty, so that appended rows line up with the header."""
        with path.open(newline="") as handle:
            header = next(csv.reader(handle), [])
        if tuple(header) != columns:
            frame = pd.read_csv(path, keep_default_na=False, dtype=str).reindex(columns=list(columns), fill_value="")
            tmp = path.with_suffix(".csv.tmp")
            frame.to_csv(tmp, index=False)
            tmp.replace(path)

    def truncate_after(self, round_: int) -> None:
        """Drop every row of a round after ``round_`` (a resumed run re-runs them: no round twice)."""
        for table in TABLES:
            path = self.path(table)
            if path.exists():
                frame = pd.read_csv(path, keep_default_na=False, dtype=str)
                kept = frame[frame["round"].astype(int) <= round_]
                tmp = path.with_suffix(".csv.tmp")
                kept.to_csv(tmp, index=False)
                tmp.replace(path)

    def read(self, table: str) -> pd.DataFrame:
        path = self.path(table)
        return pd.read_csv(path) if path.exists() else pd.DataFrame(columns=list(TABLES[table]))

    def write_json(self, name: str, data: Mapping[str, Any]) -> Path:
        path = self.dir / name
        path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
        return path
