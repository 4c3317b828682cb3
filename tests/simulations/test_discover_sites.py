"""The site handshake: a node that never names its site stops the run instead of being skipped."""

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from simulations.hospital_clip.server_app import discover_sites


@pytest.fixture(autouse=True)
def task_identity():
    """Messages are built inside a task; the Flower runtime sets its identity, here the test does."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


class _Grid:
    """Two connected nodes; only those in ``answering`` reply to the QUERY."""

    def __init__(self, answering: set[int]) -> None:
        self.answering = answering
        self.run_id = 1

    def get_node_ids(self):
        return [1, 2]

    def send_and_receive(self, messages, *, timeout=None):
        return [Message(RecordDict({"site": ConfigRecord({"site": f"hospital_{m.metadata.dst_node_id}"})}), reply_to=m)
                for m in messages if m.metadata.dst_node_id in self.answering]


def test_every_node_names_its_site():
    assert discover_sites(_Grid({1, 2}), ConfigRecord({}), expected=2, timeout=1) == {
        1: "hospital_1", 2: "hospital_2"}


def test_a_silent_node_stops_the_run_naming_it():
    with pytest.raises(RuntimeError, match=r"node\(s\) \[2\] did not say which site they are within 1s \(1 of 2"):
        discover_sites(_Grid({1}), ConfigRecord({}), expected=2, timeout=1)
