"""Durable, write-ahead privacy ledgers in SQLite: the server keeps one, and so does every site.

Spending is charged *before* it can happen and settled after, so no crash, lost reply or error
can make a ledger under-count:

1. ``begin_round`` records that a round (one attempt of it) started;
2. ``charge`` commits the planned events of every site about to be asked to train, *before*
   the message is sent (a site charges its own ledger before it trains);
3. ``settle`` marks each charge with what happened: ``confirmed`` (the reply reported events the
   plan dominates), ``failed`` (an error reply), ``refused`` (the site's policy said no) or
   ``lost`` (no reply). Every charge counts whatever its status: a reply that never arrived may
   still have been computed, and one the server saw but had not settled was paid for already. A
   reported event that the plan does not dominate is charged in full, in addition.

Each write is one transaction with ``synchronous=FULL``. A round that crashed after charging and
is re-run after a resume is charged again (attempt 2): over-counting, never under-counting.

The server also records, write-ahead, every attempt at which it is about to compute an aggregate
(``record_aggregate``): a mechanism applied *at the server* (client-level DP noise on the average)
is released once per such attempt, so its epsilon is composed over ``aggregates()``, which
survives a resume (an in-memory count restarts at zero in the resumed process). A distributed-DP
round records whose noise shares its decoded secure sum holds (``record_secure_sum``): the
epsilon each adversary faces is composed over those.

One ledger holds one privacy unit per site: record-level and identity-level events cannot be
composed into one epsilon (a patient with k images is protected by a record-level guarantee only
through group privacy, which is not an event an accountant composes), so ``charge`` refuses to
mix them (``MixedUnits``) before anything is written.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path

from fedclip.privacy.events import DpEvent
from fedclip.privacy.ledger import PrivacyLedger


class Status(StrEnum):
    PENDING = "pending"
    CONFIRMED = "confirmed"
    FAILED = "failed"
    REFUSED = "refused"
    LOST = "lost"


def dominates(plan: DpEvent, reported: DpEvent) -> bool:
    """True if ``reported`` cannot cost more than ``plan``: the same mechanism with no less noise,
    no higher sampling rate and no more steps."""
    return (
        plan.privacy_unit == reported.privacy_unit
        and plan.relation == reported.relation
        and plan.sensitivity == reported.sensitivity
        and plan.mechanism == reported.mechanism
        and (plan.grid_l2, plan.grid_l1) == (reported.grid_l2, reported.grid_l1)
        and reported.noise_multiplier >= plan.noise_multiplier > 0
        and reported.sample_rate <= plan.sample_rate
        and reported.steps <= plan.steps
    ) or plan == reported


def plan_covers(plan: Sequence[DpEvent], reported: Sequence[DpEvent]) -> bool:
    return len(plan) == len(reported) and all(dominates(p, r) for p, r in zip(plan, reported))


class MixedUnits(ValueError):
    """A charge whose privacy unit differs from the unit the site's ledger already holds."""


class LedgerStore:
    def __init__(self, path: str | Path, *, delta: float, accountant: str = "prv", create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: privacy ledger not found")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.delta = delta
        self.accountant = accountant
        PrivacyLedger(delta=delta, accountant=accountant)  # validates delta and accountant once
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS charges (id INTEGER PRIMARY KEY AUTOINCREMENT, site TEXT NOT NULL, "
            "round INTEGER NOT NULL, attempt INTEGER NOT NULL, run TEXT NOT NULL DEFAULT '', event TEXT NOT NULL, "
            "kind TEXT NOT NULL, status TEXT NOT NULL, note TEXT NOT NULL DEFAULT '', at REAL NOT NULL)"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS rounds (round INTEGER NOT NULL, attempt INTEGER NOT NULL, "
            "at REAL NOT NULL, PRIMARY KEY (round, attempt))"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS aggregates (round INTEGER NOT NULL, attempt INTEGER NOT NULL, "
            "at REAL NOT NULL, PRIMARY KEY (round, attempt))"
        )

        self._db.execute(
            "CREATE TABLE IF NOT EXISTS secure_sums (round INTEGER NOT NULL, attempt INTEGER NOT NULL, "
            "site TEXT NOT NULL, share REAL NOT NULL, at REAL NOT NULL, PRIMARY KEY (round, attempt, site))"
        )

    def _write(self, sql: str, rows: Sequence[tuple]) -> None:
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(sql, rows)

    def begin_round(self, round_: int) -> int:
        """Record the start of an attempt at ``round_``; return the attempt number (1, 2, ...)."""
        (last,) = self._db.execute("SELECT COALESCE(MAX(attempt), 0) FROM rounds WHERE round = ?", (round_,)).fetchone()
        self._write("INSERT INTO rounds (round, attempt, at) VALUES (?, ?, ?)", [(round_, last + 1, time.time())])
        return last + 1

    def last_round(self) -> int:
        (last,) = self._db.execute("SELECT COALESCE(MAX(round), 0) FROM rounds").fetchone()
        return int(last)

    def record_aggregate(self, round_: int, *, attempt: int) -> None:
        """Record, before it is computed, that the server aggregates (and may noise) this attempt."""
        self._write(
            "INSERT OR IGNORE INTO aggregates (round, attempt, at) VALUES (?, ?, ?)", [(round_, attempt, time.time())]
        )

    def aggregates(self) -> int:
        """How many aggregates the server computed (or was about to), every attempt and run counted."""
        (n,) = self._db.execute("SELECT COUNT(*) FROM aggregates").fetchone()
        return int(n)

    def record_secure_sum(self, round_: int, *, attempt: int, shares: dict[str, float]) -> None:
        """Record a decoded secure sum (distributed DP): whose noise shares it holds, each one's
        variance. Every attempt counts, so the epsilon per adversary survives a resume."""
        now = time.time()
        self._write(
            "INSERT OR IGNORE INTO secure_sums (round, attempt, site, share, at) VALUES (?, ?, ?, ?, ?)",
            [(round_, attempt, site, float(v), now) for site, v in sorted(shares.items())],
        )

    def secure_sums(self) -> list[dict[str, float]]:
        """Every recorded secure sum's shares, in order: site -> variance."""
        out: dict[tuple[int, int], dict[str, float]] = {}
        for r, a, site, share in self._db.execute(
            "SELECT round, attempt, site, share FROM secure_sums ORDER BY round, attempt, site"
        ):
            out.setdefault((r, a), {})[site] = share
        return list(out.values())

    def units(self, site: str) -> set[str]:
        """The privacy units of ``site``'s charged events."""
        return {str(e.privacy_unit) for e in self.events(site)}

    def check_unit(self, site: str, events: Sequence[DpEvent]) -> None:
        """Refuse ``events`` whose unit differs from the one this ledger holds for ``site`` (see module doc)."""
        held, new = self.units(site), {str(e.privacy_unit) for e in events}
        if held and new - held or len(new) > 1:
            raise MixedUnits(
                f"the ledger holds {'/'.join(sorted(held))}-level spending for {site}, and this round is "
                f"{'/'.join(sorted(new))}-level; one ledger composes one unit (a patient's identity-level total cannot "
                "be computed from record-level events except by group privacy). Keep the unit the ledger holds, or, "
                "for patients never spent on in this ledger, use another state folder"
            )

    def charge(self, site: str, round_: int, events: Sequence[DpEvent], *, attempt: int = 1, run: str = "") -> None:
        """Commit ``events`` as spent by ``site`` (pending until settled); refuses a second privacy unit."""
        self.check_unit(site, events)
        now = time.time()
        self._write(
            "INSERT INTO charges (site, round, attempt, run, event, kind, status, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(site, round_, attempt, run, e.to_json(), "planned", str(Status.PENDING), now) for e in events],
        )

    def settle(
        self,
        site: str,
        round_: int,
        *,
        attempt: int = 1,
        status: Status,
        note: str = "",
        reported: Sequence[DpEvent] | None = None,
    ) -> None:
        """Mark the charge of (site, round, attempt); charge ``reported`` in full if the plan does not cover it."""
        plan = self.charged(site, round_, attempt=attempt)
        row = self._db.execute(
            "SELECT run FROM charges WHERE site = ? AND round = ? AND attempt = ? AND kind = 'planned' LIMIT 1",
            (site, round_, attempt),
        ).fetchone()
        run = row[0] if row else ""
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "UPDATE charges SET status = ?, note = ? WHERE site = ? AND round = ? AND attempt = ? "
                "AND kind = 'planned'",
                (str(Status(status)), note, site, round_, attempt),
            )
            if reported is not None and not plan_covers(plan, reported):
                self._db.executemany(
                    "INSERT INTO charges (site, round, attempt, run, event, kind, status, note, at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            site,
                            round_,
                            attempt,
                            run,
                            e.to_json(),
                            "reported",
                            str(Status.CONFIRMED),
                            "reported above the plan: charged in full",
                            time.time(),
                        )
                        for e in reported
                    ],
                )

    def charged(self, site: str, round_: int, *, attempt: int = 1) -> tuple[DpEvent, ...]:
        rows = self._db.execute(
            "SELECT event FROM charges WHERE site = ? AND round = ? AND attempt = ? AND kind = 'planned' ORDER BY id",
            (site, round_, attempt),
        ).fetchall()
        return tuple(DpEvent.from_json(r[0]) for r in rows)

    def events(self, site: str, *, run: str | None = None, unit: str | None = None) -> tuple[DpEvent, ...]:
        """Every charged event of ``site`` (of one ``run``, one privacy ``unit`` if given), whatever its status."""
        sql, args = "SELECT event FROM charges WHERE site = ?", [site]
        if run is not None:
            sql, args = sql + " AND run = ?", args + [run]
        events = (DpEvent.from_json(r[0]) for r in self._db.execute(sql + " ORDER BY id", args).fetchall())
        return tuple(e for e in events if unit is None or e.privacy_unit == unit)

    def ledger(self, site: str, *, run: str | None = None, unit: str | None = None) -> PrivacyLedger:
        return PrivacyLedger(delta=self.delta, accountant=self.accountant, events=self.events(site, run=run, unit=unit))

    def rows(self) -> list[dict]:
        """Every charge, for reports and tests."""
        cur = self._db.execute("SELECT site, round, attempt, run, kind, status, note, event FROM charges ORDER BY id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    def rounds(self) -> list[tuple[str, int]]:
        """(site, round) of every charged attempt, in order (a re-run round appears once per attempt)."""
        return [
            (s, r)
            for s, r in self._db.execute(
                "SELECT site, round FROM charges WHERE kind = 'planned' GROUP BY site, round, attempt ORDER BY MIN(id)"
            )
        ]

    def sites(self) -> list[str]:
        return [s for (s,) in self._db.execute("SELECT DISTINCT site FROM charges ORDER BY site")]

    def close(self) -> None:
        self._db.close()
