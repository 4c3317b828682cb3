"""Reducers: the running mean is FedAvg's mean without the list; other strategies keep their own."""

import gc
import weakref

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg, FedMedian
from flwr.supercore.task_identity import TaskIdentity

from strategies.reducers import KeepReplies, RunningMean, reducer_for
from tests.strategies.test_privacy_budget import EVENT, SITES, StubGrid, _reply, _strategy


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _replies(n: int, rng: np.random.Generator) -> list[Message]:
    out = []
    for node in range(1, n + 1):
        arrays = ArrayRecord(
            {
                "w": Array(np.asarray(rng.normal(size=(4, 3)), dtype=np.float32)),
                "b": Array(np.asarray(rng.normal(size=5), dtype=np.float32)),
            }
        )
        metrics = MetricRecord({"site-weight": float(rng.integers(1, 9)), "train-loss": float(rng.random())})
        out.append(Message(RecordDict({"arrays": arrays, "metrics": metrics}), dst_node_id=node, message_type="train"))
    return out


def _fedavg(inner=FedAvg):
    return inner(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1, weighted_by_key="site-weight")


def test_the_running_mean_is_fedavgs_weighted_mean_and_metrics():
    replies = _replies(7, np.random.default_rng(0))
    strategy = _fedavg()
    expected_arrays, expected_metrics = strategy.aggregate_train(1, replies)
    reducer = reducer_for(strategy, 1)
    assert isinstance(reducer, RunningMean)
    for r in replies:
        reducer.add(r)
    arrays, metrics = reducer.result()
    assert set(arrays.keys()) == set(expected_arrays.keys())
    for key in arrays.keys():
        got, want = arrays[key].numpy(), expected_arrays[key].numpy()
        assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert dict(metrics) == pytest.approx(dict(expected_metrics))


def test_no_replies_give_no_aggregate():
    assert RunningMean(_fedavg()).result() == (None, None)


def test_replies_fedavg_would_refuse_are_refused():
    good, other = _replies(2, np.random.default_rng(1))
    reducer = RunningMean(_fedavg())
    reducer.add(good)
    other.content["arrays"] = ArrayRecord({"w": Array(np.zeros((4, 3), dtype=np.float32))})  # "b" missing
    reducer.add(other)  # raised where FedAvg raises, at aggregation: the caller settles its charges first
    with pytest.raises(InconsistentMessageReplies):
        reducer.result()
    unweighted = Message(
        RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))}),
                "metrics": MetricRecord({"train-loss": 1.0}),
            }
        ),
        dst_node_id=3,
        message_type="train",
    )
    reducer = RunningMean(_fedavg())
    reducer.add(unweighted)
    with pytest.raises(InconsistentMessageReplies, match="site-weight"):
        reducer.result()


def test_an_inconsistent_reply_stops_the_round_after_every_charge_is_settled(tmp_path):
    strategy = _strategy(tmp_path)
    messages = list(
        strategy.configure_train(
            1, ArrayRecord(numpy_ndarrays=[np.zeros(3, dtype=np.float32)]), ConfigRecord(), StubGrid(SITES)
        )
    )
    replies = [_reply(m, 1.0) for m in messages]
    replies[1].content["arrays"] = ArrayRecord({"other": Array(np.zeros(3, dtype=np.float32))})
    with pytest.raises(InconsistentMessageReplies):
        strategy.aggregate_train(1, iter(replies))
    statuses = {row["site"]: row["status"] for row in strategy.store.rows()}
    assert statuses == {site: "confirmed" for site in SITES.values()}, "settled before the aggregation raised"


def test_other_strategies_aggregate_the_kept_replies_their_own_way():
    replies = _replies(5, np.random.default_rng(2))
    median = _fedavg(FedMedian)
    reducer = reducer_for(median, 1)
    assert isinstance(reducer, KeepReplies), "a FedAvg subclass may aggregate differently: not folded"
    for r in replies:
        reducer.add(r)
    got, want = reducer.result()[0], median.aggregate_train(1, replies)[0]
    for key in want.keys():
        np.testing.assert_array_equal(got[key].numpy(), want[key].numpy())


def test_the_budget_strategy_folds_each_reply_and_drops_it_before_the_next_arrives(tmp_path):
    strategy = _strategy(tmp_path)
    messages = list(
        strategy.configure_train(
            1, ArrayRecord(numpy_ndarrays=[np.zeros(3, dtype=np.float32)]), ConfigRecord(), StubGrid(SITES)
        )
    )
    alive = []

    def arriving_watched():
        for m in messages:
            reply = _reply(m, float(m.metadata.dst_node_id))
            alive.append(weakref.ref(reply.content.array_records["arrays"]))
            yield reply
            del reply
            gc.collect()
            # the reply just handed over may still be bound to the consumer's loop variable; none before it
            assert all(ref() is None for ref in alive[:-1]), "an earlier reply's arrays are still held"

    arrays, _ = strategy.aggregate_train(1, arriving_watched())
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(3, (11 + 22 + 33) / 3))
    assert strategy.epsilons()["hospital_a"] == strategy.store.ledger("hospital_a").epsilon() > 0
    assert EVENT in strategy.store.events("hospital_b")
