"""PrivacyBudgetStrategy with hand-made replies (no Ray): selection, budgets, durability."""

import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedclip.privacy.events import DpEvent, events_to_wire
from fedclip.privacy.ledger_store import LedgerStore
from fedclip.privacy.policy import REFUSAL
from strategies.privacy_budget import PRIVACY_RECORD, PrivacyBudgetStrategy, SiteFailure
from strategies.registry import make_inner_strategy

EVENT = DpEvent(
    noise_multiplier=1.0, sample_rate=0.5, steps=10, privacy_unit="identity", relation="replace_one", sensitivity=1.0
)
SITES = {11: "hospital_a", 22: "hospital_b", 33: "hospital_c"}


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


class StubGrid:
    """Unit-test stand-in for the Grid: only the node listing the strategies consult."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def _arrays(value: float) -> ArrayRecord:
    return ArrayRecord(numpy_ndarrays=[np.full(3, value, dtype=np.float32)])


def _reply(msg: Message, value: float, event: DpEvent | None = EVENT, loss: float | None = None) -> Message:
    metrics = {"site-weight": 1.0} | ({"train-loss": loss} if loss is not None else {})
    content = RecordDict({"arrays": _arrays(value), "metrics": MetricRecord(metrics)})
    if event is not None:
        content[PRIVACY_RECORD] = ConfigRecord({"events": events_to_wire([event])})
    return Message(content, reply_to=msg)


def _error(msg: Message, reason: str) -> Message:
    return Message(Error(code=0, reason=reason), reply_to=msg)


def _strategy(tmp_path, budget=lambda site: math.inf, inner=None, rows=None, store=None, quorum=1.0):
    store = store or LedgerStore(tmp_path / "ledger.sqlite", delta=1e-5)
    return PrivacyBudgetStrategy(
        inner or make_inner_strategy("fedavg"),
        store=store,
        sites=SITES,
        budget=budget,
        planned_events=lambda site: (EVENT,),
        failure_quorum=quorum,
        on_round=(rows.extend if rows is not None else None),
    )


def _round(strategy, server_round, values=None):
    messages = list(strategy.configure_train(server_round, _arrays(0.0), ConfigRecord(), StubGrid(SITES)))
    values = values or {n: float(n) for n in SITES}
    replies = [_reply(m, values[m.metadata.dst_node_id]) for m in messages]
    return messages, strategy.aggregate_train(server_round, replies)


def test_all_sites_train_and_the_update_is_the_inner_average(tmp_path):
    rows = []
    strategy = _strategy(tmp_path, rows=rows)
    messages, (arrays, metrics) = _round(strategy, 1)
    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(SITES)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(3, (11 + 22 + 33) / 3))
    eps = strategy.epsilons()
    assert len(set(eps.values())) == 1 and 0 < eps["hospital_a"] < math.inf
    assert [r.site for r in rows] == sorted(SITES.values()) and all(r.selected and r.round == 1 for r in rows)
    assert rows[0].epsilon == pytest.approx(eps["hospital_a"]) and math.isnan(rows[0].train_loss)
    assert all(r.status == "trained" for r in rows)


def test_a_site_whose_next_round_would_exceed_its_budget_is_not_selected(tmp_path):
    one_round = LedgerStore(tmp_path / "probe.sqlite", delta=1e-5).ledger("x").epsilon_if(EVENT)
    two_rounds = LedgerStore(tmp_path / "probe.sqlite", delta=1e-5).ledger("x").record(EVENT).epsilon_if(EVENT)
    budgets = {
        "hospital_a": (one_round + two_rounds) / 2,
        "hospital_b": two_rounds * 1.001,
        "hospital_c": one_round * 0.5,
    }
    rows = []
    strategy = _strategy(tmp_path, budget=budgets.__getitem__, rows=rows)
    messages, _ = _round(strategy, 1)
    assert sorted(SITES[m.metadata.dst_node_id] for m in messages) == ["hospital_a", "hospital_b"]
    messages, _ = _round(strategy, 2)
    assert [SITES[m.metadata.dst_node_id] for m in messages] == ["hospital_b"]
    eps = strategy.epsilons()
    assert all(eps[s] <= budgets[s] for s in eps)  # nobody ever went past their budget
    assert eps["hospital_c"] == 0.0
    # round 3: nobody can afford another round -> no messages, clean end
    messages, (arrays, _) = _round(strategy, 3)
    assert messages == [] and arrays is None and strategy.exhausted
    selected = {(r.round, r.site): r.selected for r in rows}
    assert selected[(2, "hospital_a")] is False and selected[(3, "hospital_b")] is False


def test_events_are_durable_before_the_inner_strategy_aggregates(tmp_path):
    store = LedgerStore(tmp_path / "ledger.sqlite", delta=1e-5)
    seen = {}

    class Spy(FedAvg):
        def aggregate_train(self, server_round, replies):
            other = LedgerStore(tmp_path / "ledger.sqlite", delta=1e-5)  # a second connection: committed data only
            seen.update({s: len(other.ledger(s).events) for s in SITES.values()})
            return super().aggregate_train(server_round, replies)

    strategy = _strategy(
        tmp_path,
        inner=Spy(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1, weighted_by_key="site-weight"),
        store=store,
    )
    _round(strategy, 1)
    assert seen == {s: 1 for s in SITES.values()}


def test_ledger_survives_a_restart_and_resume_continues_it(tmp_path):
    strategy = _strategy(tmp_path)
    _round(strategy, 1)
    before = strategy.epsilons()
    strategy.store.close()
    resumed = PrivacyBudgetStrategy(
        make_inner_strategy("fedavg"),
        store=LedgerStore(tmp_path / "ledger.sqlite", delta=1e-5),
        sites=SITES,
        budget=lambda s: math.inf,
        planned_events=lambda s: (EVENT,),
        round_offset=1,
    )
    assert resumed.epsilons() == before
    _round(resumed, 1)
    assert resumed.store.rounds()[-1][1] == 2  # recorded as global round 2
    assert all(resumed.epsilons()[s] > before[s] for s in before)


def test_a_reply_without_its_privacy_events_fails_the_round_and_keeps_the_charge(tmp_path):
    strategy = _strategy(tmp_path)
    messages = list(strategy.configure_train(1, _arrays(0.0), ConfigRecord(), StubGrid(SITES)))
    replies = [_reply(m, 1.0, event=None) for m in messages]
    with pytest.raises(SiteFailure, match="carries no 'privacy' record"):
        strategy.aggregate_train(1, replies)
    assert all(e > 0 for e in strategy.epsilons().values())


def test_charges_are_durable_before_any_message_is_sent(tmp_path):
    strategy = _strategy(tmp_path)
    messages = list(strategy.configure_train(1, _arrays(0.0), ConfigRecord(), StubGrid(SITES)))
    other = LedgerStore(tmp_path / "ledger.sqlite", delta=1e-5)  # committed data only
    assert sorted(s for s, _ in other.rounds()) == sorted(SITES.values()) and len(messages) == 3
    assert {r["status"] for r in other.rows()} == {"pending"}


def test_failed_refused_and_lost_replies_keep_their_charge_and_stop_the_round(tmp_path):
    rows = []
    strategy = _strategy(tmp_path, rows=rows)
    messages = list(strategy.configure_train(1, _arrays(0.0), ConfigRecord(), StubGrid(SITES)))
    by_site = {SITES[m.metadata.dst_node_id]: m for m in messages}
    replies = [
        _reply(by_site["hospital_a"], 1.0),
        _error(by_site["hospital_b"], "ValueError: disk full"),
        _error(by_site["hospital_c"], f"{REFUSAL} at hospital_c: min-noise-multiplier: 1 < 2"),
    ]
    with pytest.raises(SiteFailure, match="hospital_b failed: ValueError: disk full.*hospital_c refused"):
        strategy.aggregate_train(1, replies)
    eps = strategy.epsilons()
    assert eps["hospital_a"] == eps["hospital_b"] == eps["hospital_c"] > 0
    status = {r.site: r.status for r in rows}
    assert status == {"hospital_a": "trained", "hospital_b": "failed", "hospital_c": "refused"}
    # a lost reply (none at all) is charged too, and a quorum lets the round count without it
    quorum = _strategy(tmp_path / "q", quorum=0.5)
    messages = list(quorum.configure_train(1, _arrays(0.0), ConfigRecord(), StubGrid(SITES)))
    arrays, _ = quorum.aggregate_train(1, [_reply(m, 6.0) for m in messages[:2]])
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(3, 6.0))
    assert len(set(quorum.epsilons().values())) == 1
    assert {r["status"] for r in quorum.store.rows()} == {"confirmed", "lost"}


def test_a_reported_event_above_the_plan_is_charged_in_full(tmp_path):
    strategy = _strategy(tmp_path)
    messages = list(strategy.configure_train(1, _arrays(0.0), ConfigRecord(), StubGrid(SITES)))
    bigger = DpEvent(
        noise_multiplier=0.5,
        sample_rate=0.5,
        steps=10,
        privacy_unit="identity",
        relation="replace_one",
        sensitivity=1.0,
    )
    smaller = DpEvent(
        noise_multiplier=2.0, sample_rate=0.5, steps=5, privacy_unit="identity", relation="replace_one", sensitivity=1.0
    )
    events = {11: EVENT, 22: bigger, 33: smaller}
    strategy.aggregate_train(1, [_reply(m, 1.0, event=events[m.metadata.dst_node_id]) for m in messages])
    assert strategy.store.events("hospital_a") == (EVENT,)
    assert strategy.store.events("hospital_b") == (EVENT, bigger)  # the plan and, in full, what was run
    assert strategy.store.events("hospital_c") == (EVENT,)  # dominated by the plan: the plan's charge stands


def test_duplicate_sites_are_refused(tmp_path):
    store = LedgerStore(tmp_path / "ledger.sqlite", delta=1e-5)
    with pytest.raises(ValueError, match="same site"):
        PrivacyBudgetStrategy(
            make_inner_strategy("fedavg"),
            store=store,
            sites={1: "a", 2: "a"},
            budget=lambda s: 1.0,
            planned_events=lambda s: (EVENT,),
        )


def test_unknown_inner_strategy_is_named():
    with pytest.raises(ValueError, match="strategy: unknown inner strategy 'fedfoo'"):
        make_inner_strategy("fedfoo")


def test_the_reply_observer_sees_each_confirmed_reply_once_before_it_is_folded(tmp_path):
    seen = []
    store = LedgerStore(tmp_path / "ledger.sqlite", delta=1e-5)
    strategy = PrivacyBudgetStrategy(
        make_inner_strategy("fedavg"),
        store=store,
        sites=SITES,
        budget=lambda s: math.inf,
        planned_events=lambda site: (EVENT,),
        failure_quorum=0.5,
        on_reply=lambda r, site, arrays: seen.append((r, site, arrays.to_numpy_ndarrays()[0][0])),
    )
    messages = list(strategy.configure_train(1, _arrays(0.0), ConfigRecord(), StubGrid(SITES)))
    by_site = {SITES[m.metadata.dst_node_id]: m for m in messages}
    replies = [
        _reply(by_site["hospital_a"], 1.0),
        _reply(by_site["hospital_a"], 9.0),  # a duplicate: ignored
        _reply(by_site["hospital_b"], 2.0),
        _error(by_site["hospital_c"], "ValueError: disk full"),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert seen == [(1, "hospital_a", 1.0), (1, "hospital_b", 2.0)], "confirmed replies only, each once"
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(3, 1.5))


def test_observers_that_fail_keep_neither_the_charged_round_from_being_sent_nor_it_from_settling(tmp_path):
    def fails_on_reply(round_, site, arrays):
        raise ValueError("arrays: weight has shape (2, 2), the model expects (1, 4)")

    def fails_on_send(round_, arrays):
        raise RuntimeError("canary secret unreadable")

    store = LedgerStore(tmp_path / "ledger.sqlite", delta=1e-5)
    strategy = PrivacyBudgetStrategy(
        make_inner_strategy("fedavg"),
        store=store,
        sites=SITES,
        budget=lambda s: math.inf,
        planned_events=lambda site: (EVENT,),
        on_reply=fails_on_reply,
        on_send=fails_on_send,
    )
    messages = list(strategy.configure_train(1, _arrays(0.0), ConfigRecord(), StubGrid(SITES)))
    assert len(messages) == len(SITES) and {row["status"] for row in store.rows()} == {"pending"}
    arrays, _ = strategy.aggregate_train(1, [_reply(m, 3.0) for m in messages])
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(3, 3.0))
    assert {row["status"] for row in store.rows()} == {"confirmed"}
