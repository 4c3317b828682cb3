"""A site's own account (spending.md): every charge, the rounds that failed with their noted error,
and the rounds its policy refused (nothing charged for them)."""

from fedclip.privacy.events import DpEvent
from fedclip.privacy.ledger_store import LedgerStore, Status
from fedclip.reporting.run_files import RunFiles
from fedclip.reporting.spending import spending_table, write_spending

E = DpEvent(
    noise_multiplier=2.0, sample_rate=0.5, steps=10, privacy_unit="identity", relation="replace_one", sensitivity=1.0
)


def test_spending_md_lists_charges_failures_and_refusals(tmp_path):
    store = LedgerStore(tmp_path / "ledger.sqlite", delta=1e-5)
    for round_, status, note in (
        (1, Status.CONFIRMED, ""),
        (2, Status.FAILED, "OSError: disk full\nat line 3"),
        (3, Status.LOST, ""),
    ):
        attempt = store.begin_round(round_)
        store.charge("h", round_, (E,), attempt=attempt, run="r1")
        settled = {"reported": (E,)} if status is Status.CONFIRMED else {"note": note}
        store.settle("h", round_, attempt=attempt, status=status, **settled)
    RunFiles(tmp_path).append(
        "site_refusals",
        [{"round": 4, "run": "r1", "at": 0.0, "rule": "max-epsilon-total", "reason": "over the cap | 3.1"}],
    )
    text = write_spending(store, tmp_path).read_text()
    table = spending_table(store)
    assert list(table["status"]) == ["confirmed", "failed", "lost"]  # every charge counts
    assert f"{table['epsilon_total'].iloc[-1]:.3f}" in text
    failures = text.split("## Rounds that failed")[1].split("##")[0]
    assert "| r1 | 2 | 1 | failed | OSError: disk full at line 3 |" in failures
    assert "| r1 | 3 | 1 | lost | (none recorded) |" in failures
    refusals = text.split("## Rounds this site's policy refused (1; nothing charged)")[1]
    assert "| r1 | 4 | max-epsilon-total | over the cap / 3.1 |" in refusals


def test_a_site_with_nothing_failed_or_refused_has_no_such_sections(tmp_path):
    store = LedgerStore(tmp_path / "ledger.sqlite", delta=1e-5)
    store.charge("h", 1, (E,), attempt=store.begin_round(1), run="r1")
    text = write_spending(store, tmp_path).read_text()
    assert "failed" not in text.split("|---|")[-1] and "refused" not in text
