"""PrivacyBudgetStrategy with hand-made replies (no Ray): selection, budgets, durability."""

import math

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedclip.privacy.events import DpEvent
from strategies import LedgerStore, PrivacyBudgetStrategy, make_inner_strategy
from strategies.privacy_budget import PRIVACY_RECORD

EVENT = DpEvent(noise_multiplier=1.0, sample_rate=0.5, steps=10, privacy_unit="identity", relation="replace_one",
                sensitivity=1.0)
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


def _reply(msg: Message, value: float, event: DpEvent | None = EVENT, loss: float = 1.5) -> Message:
    content = RecordDict({"arrays": _arrays(value), "metrics": MetricRecord({"num-examples": 10, "train-loss": loss})})
    if event is not None:
        content[PRIVACY_RECORD] = ConfigRecord(event.to_dict())
    return Message(content, reply_to=msg)


def _strategy(tmp_path, budget=lambda site: math.inf, inner=None, rows=None, store=None):
    store = store or LedgerStore(tmp_path / "ledger.sqlite", delta=1e-5)
    return PrivacyBudgetStrategy(inner or make_inner_strategy("fedavg"), store=store, sites=SITES, budget=budget,
                                 planned_event=lambda site: EVENT, on_round=(rows.extend if rows is not None else None))


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
    assert rows[0].epsilon == pytest.approx(eps["hospital_a"]) and rows[0].train_loss == 1.5


def test_a_site_whose_next_round_would_exceed_its_budget_is_not_selected(tmp_path):
    one_round = LedgerStore(tmp_path / "probe.sqlite", delta=1e-5).ledger("x").epsilon_if(EVENT)
    two_rounds = LedgerStore(tmp_path / "probe.sqlite", delta=1e-5).ledger("x").record(EVENT).epsilon_if(EVENT)
    budgets = {"hospital_a": (one_round + two_rounds) / 2, "hospital_b": two_rounds * 1.001, "hospital_c": one_round * 0.5}
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

    strategy = _strategy(tmp_path, inner=Spy(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1), store=store)
    _round(strategy, 1)
    assert seen == {s: 1 for s in SITES.values()}


def test_ledger_survives_a_restart_and_resume_continues_it(tmp_path):
    strategy = _strategy(tmp_path)
    _round(strategy, 1)
    before = strategy.epsilons()
    strategy.store.close()
    resumed = PrivacyBudgetStrategy(make_inner_strategy("fedavg"), store=LedgerStore(tmp_path / "ledger.sqlite", delta=1e-5),
                                    sites=SITES, budget=lambda s: math.inf, planned_event=lambda s: EVENT, round_offset=1)
    assert resumed.epsilons() == before
    _round(resumed, 1)
    assert resumed.store.rounds()[-1][1] == 2  # recorded as global round 2
    assert all(resumed.epsilons()[s] > before[s] for s in before)


def test_a_reply_without_its_privacy_event_is_refused(tmp_path):
    strategy = _strategy(tmp_path)
    messages = list(strategy.configure_train(1, _arrays(0.0), ConfigRecord(), StubGrid(SITES)))
    replies = [_reply(m, 1.0, event=None) for m in messages]
    with pytest.raises(ValueError, match="carries no 'privacy' record"):
        strategy.aggregate_train(1, replies)


def test_failed_replies_spend_nothing_and_duplicate_sites_are_refused(tmp_path):
    strategy = _strategy(tmp_path)
    messages = list(strategy.configure_train(1, _arrays(0.0), ConfigRecord(), StubGrid(SITES)))
    replies = [_reply(m, 1.0) for m in messages[:2]]
    strategy.aggregate_train(1, replies)
    assert sorted(s for s, e in strategy.epsilons().items() if e > 0) == sorted(SITES[m.metadata.dst_node_id] for m in messages[:2])
    with pytest.raises(ValueError, match="same site"):
        PrivacyBudgetStrategy(make_inner_strategy("fedavg"), store=strategy.store, sites={1: "a", 2: "a"},
                              budget=lambda s: 1.0, planned_event=lambda s: EVENT)


def test_unknown_inner_strategy_is_named():
    with pytest.raises(ValueError, match="strategy: unknown inner strategy 'fedfoo'"):
        make_inner_strategy("fedfoo")
