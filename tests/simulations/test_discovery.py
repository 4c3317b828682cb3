"""The site handshake: which node is which site, and what stops the run instead of being skipped.

A node that never names its site, claims a site nobody declared, claims a site another node
already claims, or (with ``site-nodes``) says it is not the site its registered key belongs to,
stops the run with a message naming it.
"""

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from simulations.hospital_clip.discovery import discover_sites


@pytest.fixture(autouse=True)
def task_identity():
    """Messages are built inside a task; the Flower runtime sets its identity, here the test does."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


class _Grid:
    """Connected nodes {node id: the site it claims}; only those in ``answering`` reply."""

    def __init__(self, claims: dict[int, str], answering: set[int] | None = None) -> None:
        self.claims = claims
        self.answering = set(claims) if answering is None else answering
        self.asked: list[int] = []
        self.run_id = 1

    def get_node_ids(self):
        return list(self.claims)

    def send_and_receive(self, messages, *, timeout=None):
        self.asked += [m.metadata.dst_node_id for m in messages]
        return [
            Message(RecordDict({"site": ConfigRecord({"site": self.claims[m.metadata.dst_node_id]})}), reply_to=m)
            for m in messages
            if m.metadata.dst_node_id in self.answering
        ]


TWO = {1: "hospital_1", 2: "hospital_2"}


def test_every_node_names_its_site():
    assert discover_sites(_Grid(TWO), ConfigRecord({}), expected=["hospital_1", "hospital_2"], timeout=1) == TWO


def test_a_silent_node_stops_the_run_naming_it():
    with pytest.raises(RuntimeError, match=r"node\(s\) \[2\] did not say which site they are within 1s \(1 of 2"):
        discover_sites(_Grid(TWO, answering={1}), ConfigRecord({}), expected=["hospital_1", "hospital_2"], timeout=1)


def test_a_node_claiming_an_undeclared_site_stops_the_run():
    with pytest.raises(RuntimeError, match=r"claim sites \['hospital_9'\] that are not expected"):
        discover_sites(
            _Grid({1: "hospital_1", 2: "hospital_9"}),
            ConfigRecord({}),
            expected=["hospital_1", "hospital_2"],
            timeout=1,
        )


def test_two_nodes_claiming_one_site_stop_the_run():
    with pytest.raises(RuntimeError, match=r"two nodes claim the same site \['hospital_1'\]"):
        discover_sites(
            _Grid({1: "hospital_1", 2: "hospital_1"}),
            ConfigRecord({}),
            expected=["hospital_1", "hospital_2"],
            timeout=1,
        )


def test_with_site_nodes_the_registered_id_decides_and_strangers_are_not_asked():
    grid = _Grid({7: "hospital_a", 8: "hospital_b", 9: "hospital_a"})  # node 9: someone else's claim
    sites = discover_sites(
        grid,
        ConfigRecord({}),
        expected=["hospital_a", "hospital_b"],
        node_ids={"hospital_a": 7, "hospital_b": 8},
        timeout=1,
    )
    assert sites == {7: "hospital_a", 8: "hospital_b"} and sorted(grid.asked) == [7, 8]


def test_with_site_nodes_a_node_that_says_it_is_another_site_stops_the_run():
    with pytest.raises(RuntimeError, match=r"node 8 is registered as 'hospital_b' but says it is 'hospital_a'"):
        discover_sites(
            _Grid({7: "hospital_a", 8: "hospital_a"}),
            ConfigRecord({}),
            expected=["hospital_a", "hospital_b"],
            node_ids={"hospital_a": 7, "hospital_b": 8},
            timeout=1,
        )


def test_with_site_nodes_a_registered_node_that_never_connects_is_named():
    with pytest.raises(RuntimeError, match=r"waiting for node ids \[8\]"):
        discover_sites(
            _Grid({7: "hospital_a"}),
            ConfigRecord({}),
            expected=["hospital_a", "hospital_b"],
            node_ids={"hospital_a": 7, "hospital_b": 8},
            timeout=0.2,
        )
