"""Flower's SecAgg+ (its workflow and its mod, unchanged) carrying the sites' integer vectors:
the decoded sum is exact, a masked vector looks uniform, dropouts are handled as the protocol
promises, and a stage left with too few sites fails loudly. The transport is the in-process grid
of the fault tests; everything else is Flower's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.supercore.task_identity import TaskIdentity
from scipy.stats import chisquare

from fedclip.distributed.grid import Grid
from fedclip.distributed.skellam import skellam_noise
from strategies.secure_sum import (
    REPORT,
    VECTOR,
    SecureSumFailed,
    check_secure_sum,
    max_bits,
    secure_sum,
    secure_sum_mod,
)
from tests.faults.local_grid import LocalGrid

DIM, BITS = 5000, 20
CRASH: dict[int, str] = {}  # node id -> the SecAgg+ stage (Flower's name) at which that site dies


def vector_of(node_id: int) -> np.ndarray:
    """A site's noisy integer vector: a signal plus a Skellam share, as a distributed-DP site sends."""
    gen = torch.Generator().manual_seed(node_id)
    signal = torch.randint(-40_000, 40_000, (DIM,), generator=gen)
    return (signal + skellam_noise((DIM,), variance=1e8, generator=gen)).numpy()


def crash_mod(msg, context, call_next):
    stage = (
        msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
        if RECORD_KEY_CONFIGS in msg.content.config_records
        else None
    )
    if stage is not None and CRASH.get(context.node_id) == stage:
        raise RuntimeError(f"site {context.node_id} dies at {stage}")
    return call_next(msg, context)


app = ClientApp(mods=[crash_mod, secure_sum_mod])


@app.train()
def train(msg: Message, context) -> Message:
    assert int(msg.content["config"]["planned-round"]) == 7  # the instructions reach the site's handler
    assert list(msg.content["arrays"]) == ["weights.a", "weights.b"]  # named as the server named them
    assert np.array_equal(msg.content["arrays"]["weights.b"].numpy(), np.arange(3.0))
    wrapped = np.mod(vector_of(context.node_id), 2**BITS)
    content = RecordDict({VECTOR: ArrayRecord({"vector": Array(wrapped)}), REPORT: ConfigRecord({"share": 1e8})})
    return Message(content, reply_to=msg)


class SpyGrid(LocalGrid):
    """The real in-process grid, keeping what the server received at the masked-vector stage."""

    def __init__(self, num_nodes: int) -> None:
        super().__init__(num_nodes, app=app)
        self.masked: dict[int, np.ndarray] = {}

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        for r in replies:
            if not r.has_error() and Key.MASKED_PARAMETERS in r.content.config_records.get(RECORD_KEY_CONFIGS, {}):
                arrays = [
                    bytes_to_ndarray(b) for b in r.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
                ]
                self.masked[r.metadata.src_node_id] = arrays[1]
        return replies


@pytest.fixture(autouse=True)
def no_crash():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0  # as a ServerApp's process has them
    CRASH.clear()
    yield
    CRASH.clear()


def run(grid: LocalGrid, *, threshold: int = 3):
    arrays = ArrayRecord({"weights.a": Array(np.ones((2, 2))), "weights.b": Array(np.arange(3.0))})
    instructions = {nid: (arrays, ConfigRecord({"planned-round": 7})) for nid in grid.get_node_ids()}
    return secure_sum(grid, instructions=instructions, bits=BITS, threshold=threshold, round_=1)


def expected(nodes) -> np.ndarray:
    return Grid(scale=1.0, bits=BITS, dim=DIM).centre(torch.as_tensor(sum(vector_of(n) for n in nodes))).numpy()


def test_the_decoded_sum_is_exactly_the_modular_sum_of_the_sites_vectors():
    grid = SpyGrid(4)
    result = run(grid)
    assert result.in_sum == (1, 2, 3, 4)
    assert np.array_equal(result.total, expected([1, 2, 3, 4]))
    assert result.reports == {n: {"share": 1e8} for n in (1, 2, 3, 4)}


def test_what_the_server_receives_from_one_site_is_uniform():
    """The masked vector of each site, as the server got it: a chi-square test against uniform on
    [0, 2**32) (64 bins), and nothing of the plain vector's shape (it is far from uniform there)."""
    grid = SpyGrid(4)
    run(grid)
    assert set(grid.masked) == {1, 2, 3, 4}
    for node, masked in grid.masked.items():
        counts = np.bincount((masked.astype(np.int64) >> 26).ravel(), minlength=64)
        assert chisquare(counts).pvalue > 1e-4, node
        plain = np.mod(vector_of(node), 2**BITS)
        assert chisquare(np.bincount(plain >> 26, minlength=64) + 1).pvalue < 1e-100  # the test can tell
        assert not np.array_equal(masked.astype(np.int64) % 2**BITS, plain)


@pytest.mark.parametrize(
    "stage,in_sum",
    [
        ("setup", (1, 2, 4)),
        ("share_keys", (1, 2, 4)),
        ("collect_masked_vectors", (1, 2, 4)),  # died before sending its masked vector: not in the sum
        ("unmask", (1, 2, 3, 4)),  # died after sending it: recovered from the others' shares
    ],
)
def test_a_site_killed_at_each_stage_is_in_the_sum_exactly_when_it_sent_its_masked_vector(stage, in_sum):
    CRASH[3] = stage
    result = run(SpyGrid(4))
    assert result.in_sum == in_sum
    assert np.array_equal(result.total, expected(in_sum))


@pytest.mark.parametrize("stage", ["share_keys", "collect_masked_vectors", "unmask"])
def test_fewer_sites_than_the_threshold_fail_the_sum_loudly_naming_the_stage(stage):
    CRASH.update({2: stage, 3: stage})
    with pytest.raises(SecureSumFailed, match="threshold 3") as info:
        run(SpyGrid(4), threshold=3)
    assert info.value.stage == stage.replace("_", "-")


@pytest.mark.parametrize(
    "stage,in_sum", [("collect_masked_vectors", (1, 2, 4, 5, 6, 7)), ("unmask", tuple(range(1, 8)))]
)
def test_secagg_plus_neighbourhoods_decode_exactly_and_recover_a_site_after_its_masked_vector(stage, in_sum):
    """SecAgg+'s ring: each of 7 sites shares keys with 5 (itself included), threshold 3."""
    CRASH[3] = stage
    grid = SpyGrid(7)
    arrays = ArrayRecord({"weights.a": Array(np.ones((2, 2))), "weights.b": Array(np.arange(3.0))})
    instructions = {nid: (arrays, ConfigRecord({"planned-round": 7})) for nid in grid.get_node_ids()}
    result = secure_sum(grid, instructions=instructions, bits=BITS, threshold=3, neighbours=5, round_=1)
    assert result.in_sum == in_sum and np.array_equal(result.total, expected(in_sum))
    with pytest.raises(ValueError, match="secure-agg-neighbours"):
        check_secure_sum(num_sites=7, bits=BITS, threshold=3, neighbours=4)
    with pytest.raises(ValueError, match="secure-agg-threshold: expected fewer than secure-agg-neighbours"):
        check_secure_sum(num_sites=7, bits=BITS, threshold=5, neighbours=5)


def test_the_widest_sum_for_the_sites_decodes_exactly():
    """At max_bits the sites' weights sum to just below 2**32 (Flower divides by that sum)."""
    global BITS
    old, BITS = BITS, max_bits(4)
    try:
        result = run(SpyGrid(4))
        assert np.array_equal(
            result.total,
            Grid(scale=1.0, bits=BITS, dim=DIM)
            .centre(torch.as_tensor(sum(vector_of(n) for n in (1, 2, 3, 4))))
            .numpy(),
        )
    finally:
        BITS = old


def test_bad_settings_are_refused_by_key_before_anything_runs():
    assert max_bits(4) == 29 and max_bits(64) == 25 and max_bits(256) == 23 and max_bits(2) == 30 and max_bits(3) == 30
    with pytest.raises(ValueError, match="secure-agg-bits"):
        check_secure_sum(num_sites=64, bits=26, threshold=10)
    with pytest.raises(ValueError, match="secure-agg-threshold"):
        check_secure_sum(num_sites=4, bits=20, threshold=5)
    with pytest.raises(ValueError, match="num_sites"):
        check_secure_sum(num_sites=1, bits=20, threshold=2)
