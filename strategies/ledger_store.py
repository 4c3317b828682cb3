"""Durable per-site privacy ledgers in SQLite.

Every event is committed (``synchronous=FULL``) before the update it paid for is aggregated, so
a crash at any point can only over-count spending, never under-count it: a round that crashed
after its events were written is paid for again when it is re-run after a resume.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from fedclip.privacy.events import DpEvent
from fedclip.privacy.ledger import PrivacyLedger


class LedgerStore:
    def __init__(self, path: str | Path, *, delta: float, accountant: str = "prv") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.delta = delta
        self.accountant = accountant
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT, site TEXT NOT NULL, "
            "round INTEGER NOT NULL, event TEXT NOT NULL)"
        )
        PrivacyLedger(delta=delta, accountant=accountant)  # validates delta and accountant once

    def append(self, site: str, round_: int, event: DpEvent) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT INTO events (site, round, event) VALUES (?, ?, ?)", (site, round_, event.to_json()))

    def ledger(self, site: str) -> PrivacyLedger:
        rows = self._db.execute("SELECT event FROM events WHERE site = ? ORDER BY id", (site,)).fetchall()
        return PrivacyLedger(delta=self.delta, accountant=self.accountant,
                             events=tuple(DpEvent.from_json(r[0]) for r in rows))

    def rounds(self) -> list[tuple[str, int]]:
        return [(s, r) for s, r in self._db.execute("SELECT site, round FROM events ORDER BY id")]

    def close(self) -> None:
        self._db.close()
