"""What a site has spent, read from its own ledger: ``spending.csv``, ``spending.md``, ``spending.json``.

A hospital should not have to trust the server's tables to know its own privacy spending. Its
ClientApp rewrites these files (the JSON holds the totals, for scripts) in its state folder after every round it settles, from the
ledger it keeps itself; ``fedclip spending STATE_DIR`` prints them.

Every charge counts, whatever its status (a failed or lost round may have touched the data), so
the epsilon here is the same conservative total the site's policy checks against.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import pandas as pd

from fedclip.privacy.events import DpEvent
from fedclip.privacy.ledger import PrivacyLedger
from fedclip.privacy.ledger_store import LedgerStore

COLUMNS = (
    "site",
    "run",
    "round",
    "attempt",
    "status",
    "privacy_unit",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "epsilon_total",
    "delta",
)


@lru_cache(maxsize=4096)
def _epsilon(delta: float, accountant: str, events: tuple[DpEvent, ...]) -> float:
    """The total after a prefix of charges: a site writes its account when it charges and again when
    it settles (and a site worker every round), so each prefix is composed once per process."""
    return PrivacyLedger(delta=delta, accountant=accountant, events=events).epsilon()


def spending_table(store: LedgerStore) -> pd.DataFrame:
    """One row per charged attempt, in order, with the site's total epsilon (for that privacy
    unit, over every earlier charge too) after it."""
    rows, spent = [], {}
    attempts: dict[tuple, list[dict]] = {}
    for charge in store.rows():
        attempts.setdefault((charge["site"], charge["round"], charge["attempt"], charge["run"]), []).append(charge)
    for (site, round_, attempt, run), charges in attempts.items():
        events = [DpEvent.from_json(c["event"]) for c in charges]
        training = events[0]
        for e in events:
            spent.setdefault((site, str(e.privacy_unit)), []).append(e)
        unit = str(training.privacy_unit)
        eps = _epsilon(store.delta, store.accountant, tuple(spent[(site, unit)]))
        rows.append(
            {
                "site": site,
                "run": run,
                "round": round_,
                "attempt": attempt,
                "status": charges[0]["status"],
                "privacy_unit": unit,
                "noise_multiplier": training.noise_multiplier,
                "sample_rate": training.sample_rate,
                "steps": training.steps,
                "epsilon_total": eps,
                "delta": store.delta,
            }
        )
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _failures(store: LedgerStore) -> list[str]:
    """The charged attempts that did not confirm, with the error noted at the site (kept here, never sent)."""
    attempts = {
        (r["run"], r["round"], r["attempt"]): r
        for r in store.rows()
        if r["status"] in ("failed", "lost") and r["kind"] == "planned"
    }
    failed = list(attempts.values())
    if not failed:
        return []
    lines = ["", "## Rounds that failed (charged all the same)", "", "| run | round | attempt | status | error |"]
    lines.append("|---|---|---|---|---|")
    for r in failed:
        note = " ".join(str(r["note"]).split())[:200].replace("|", "/") or "(none recorded)"
        lines.append(f"| {r['run']} | {r['round']} | {r['attempt']} | {r['status']} | {note} |")
    return lines


def _refusals(folder: Path) -> list[str]:
    """The rounds this site's policy refused (``site_refusals.csv``): nothing was charged for them."""
    path = folder / "site_refusals.csv"
    if not path.is_file():
        return []
    table = pd.read_csv(path, keep_default_na=False)
    if table.empty:
        return []
    lines = ["", f"## Rounds this site's policy refused ({len(table)}; nothing charged)", ""]
    lines += ["| run | round | rule | reason |", "|---|---|---|---|"]
    for r in table.tail(50).itertuples():
        lines.append(f"| {r.run} | {r.round} | {r.rule} | {str(r.reason).replace('|', '/')} |")
    if len(table) > 50:
        lines.append(f"\n(the last 50 of {len(table)}: all in `{path.name}`)")
    return lines


def write_spending(store: LedgerStore, folder: str | Path) -> Path:
    """Rewrite ``spending.csv`` and ``spending.md`` in ``folder`` from ``store``; returns the .md."""
    folder = Path(folder)
    table = spending_table(store)
    table.to_csv(folder / "spending.csv", index=False)
    lines = [
        "# Privacy spending of this site (from its own ledger)",
        "",
        f"Ledger: `{store.path.resolve()}`; accountant {store.accountant}, delta {store.delta:g}. Every charge "
        "counts, also of rounds that failed or whose reply was lost.",
        "",
        "| site | run | round | attempt | status | unit | noise multiplier | sample rate | steps | epsilon so far |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table.itertuples():
        eps = f"{r.epsilon_total:.3f}" if math.isfinite(r.epsilon_total) else "inf"
        lines.append(
            f"| {r.site} | {r.run} | {r.round} | {r.attempt} | {r.status} | {r.privacy_unit} | "
            f"{r.noise_multiplier:.4g} | {r.sample_rate:g} | {r.steps} | {eps} |"
        )
    lines += _failures(store) + _refusals(folder)
    path = folder / "spending.md"
    path.write_text("\n".join(lines) + "\n")
    (folder / "spending.json").write_text(
        json.dumps(
            {
                site: {
                    unit: float(g["epsilon_total"].iloc[-1]) if math.isfinite(g["epsilon_total"].iloc[-1]) else "inf"
                    for unit, g in t.groupby("privacy_unit")
                }
                for site, t in table.groupby("site")
            },
            indent=2,
        )
    )
    return path
