"""The write-ahead ledger: charges before settlement, nothing is ever un-charged."""

import pytest

from fedclip.privacy.events import DpEvent
from fedclip.privacy.ledger_store import LedgerStore, MixedUnits, Status, dominates

E = DpEvent(
    noise_multiplier=2.0, sample_rate=0.5, steps=10, privacy_unit="identity", relation="replace_one", sensitivity=1.0
)


def _event(**kw) -> DpEvent:
    return DpEvent(**{**E.to_dict(), **kw})


def test_a_charge_counts_from_the_moment_it_is_written_whatever_happens_next(tmp_path):
    store = LedgerStore(tmp_path / "l.sqlite", delta=1e-5)
    attempt = store.begin_round(1)
    store.charge("a", 1, (E,), attempt=attempt)
    store.charge("b", 1, (E,), attempt=attempt)
    pending = store.ledger("a").epsilon()
    assert pending > 0 and pending == store.ledger("b").epsilon()
    store.settle("a", 1, attempt=attempt, status=Status.FAILED, note="boom")
    store.settle("b", 1, attempt=attempt, status=Status.LOST)
    reopened = LedgerStore(tmp_path / "l.sqlite", delta=1e-5, create=False)
    assert reopened.ledger("a").epsilon() == pending == reopened.ledger("b").epsilon()
    assert {(r["site"], r["status"], r["note"]) for r in reopened.rows()} == {
        ("a", "failed", "boom"),
        ("b", "lost", ""),
    }


def test_rounds_and_attempts_are_recorded(tmp_path):
    store = LedgerStore(tmp_path / "l.sqlite", delta=1e-5)
    assert store.last_round() == 0
    assert store.begin_round(1) == 1 and store.begin_round(2) == 1 and store.begin_round(2) == 2
    assert store.last_round() == 2


def test_dominance_decides_whether_a_report_is_charged_again(tmp_path):
    assert dominates(E, E)
    assert dominates(E, _event(noise_multiplier=3.0, steps=5, sample_rate=0.4))
    for worse in (
        _event(noise_multiplier=1.0),
        _event(steps=11),
        _event(sample_rate=0.6),
        _event(sensitivity=2.0),
        _event(relation="add_or_remove"),
        _event(privacy_unit="record"),
    ):
        assert not dominates(E, worse)
    store = LedgerStore(tmp_path / "l.sqlite", delta=1e-5)
    store.charge("a", 1, (E,))
    store.settle("a", 1, status=Status.CONFIRMED, reported=(_event(noise_multiplier=1.0),))
    assert store.events("a") == (E, _event(noise_multiplier=1.0))
    assert store.ledger("a").epsilon() > LedgerStore(tmp_path / "m.sqlite", delta=1e-5).ledger("x").record(E).epsilon()


def test_a_missing_ledger_is_not_silently_created_when_one_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="privacy ledger not found"):
        LedgerStore(tmp_path / "none.sqlite", delta=1e-5, create=False)
    assert not (tmp_path / "none.sqlite").exists()


def test_per_run_views_and_one_unit_per_site(tmp_path):
    store = LedgerStore(tmp_path / "l.sqlite", delta=1e-5)
    store.charge("a", 1, (E,), run="r1")
    store.charge("a", 1, (E,), run="r2")
    store.charge("b", 1, (_event(privacy_unit="record"),), run="r2")  # another site may hold another unit
    assert len(store.events("a")) == 2 and len(store.events("a", run="r1")) == 1
    with pytest.raises(MixedUnits, match="holds identity-level spending for a, and this round is record-level"):
        store.charge("a", 2, (_event(privacy_unit="record"),), run="r2")
    assert len(store.events("a")) == 2  # nothing written
    with pytest.raises(MixedUnits):
        store.check_unit("c", (E, _event(privacy_unit="record")))


def test_a_charge_above_the_plan_keeps_the_run(tmp_path):
    store = LedgerStore(tmp_path / "l.sqlite", delta=1e-5)
    store.charge("a", 1, (E,), run="r7")
    store.settle("a", 1, status=Status.CONFIRMED, reported=(_event(noise_multiplier=1.0),))
    assert [r["run"] for r in store.rows()] == ["r7", "r7"]
    assert len(store.events("a", run="r7")) == 2


def test_aggregates_are_counted_durably_once_per_attempt(tmp_path):
    store = LedgerStore(tmp_path / "l.sqlite", delta=1e-5)
    store.record_aggregate(1, attempt=1)
    store.record_aggregate(1, attempt=1)  # the same attempt: once
    store.record_aggregate(2, attempt=1)
    store.record_aggregate(2, attempt=2)
    store.close()
    assert LedgerStore(tmp_path / "l.sqlite", delta=1e-5).aggregates() == 3
