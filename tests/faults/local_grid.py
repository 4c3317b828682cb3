"""A test transport: the real ServerApp's ``run`` drives the real ClientApp in this process.

Ray is not needed to show what a crash does to the ledgers, and a killed Ray driver leaves
workers behind; so fault-injection runs swap only the transport. Each message is delivered to
the ClientApp as it is pushed (so at the ``sent`` phase the sites have trained and charged their
own ledgers, the hardest case for the server), and replies are pulled afterwards.

    python -m tests.faults.local_grid OUT CACHE "key=value ..."   (FEDCLIP_CRASH_AT=phase:round)
"""

from __future__ import annotations

import copy
import os
import sys
import uuid
from collections.abc import Iterable

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from simulations.cli import parse_run_config
from simulations.hospital_clip import client_app
from simulations.hospital_clip.server_app import default_run_config, resolve_config, run


class LocalGrid(Grid):
    def __init__(self, num_nodes: int, app=None) -> None:
        self.app = app if app is not None else client_app
        self.contexts = {
            n + 1: Context(run_id=1, node_id=n + 1, node_config={"partition-id": n}, state=RecordDict(), run_config={})
            for n in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}

    def set_run(self, run) -> None:  # pragma: no cover - not used by the ServerApp
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg_id = str(uuid.uuid4())
            msg.metadata.__dict__["_message_id"] = msg_id  # as Flower's grids do: the reply names it
            if _lost(msg):  # a SuperNode killed before this message: the SuperLink answers for it, as Flower's does
                from flwr.app import Error
                from flwr.common.constant import ErrorCode
                from flwr.server.superlink.linkstate.utils import NODE_UNAVAILABLE_ERROR_REASON

                error = Error(code=ErrorCode.NODE_UNAVAILABLE, reason=NODE_UNAVAILABLE_ERROR_REASON)
                self._replies[msg_id] = Message(error, reply_to=msg)
                ids.append(msg_id)
                continue
            try:
                # a copy, as a real transport delivers one: Flower's workflows send one content to many nodes
                self._replies[msg_id] = self.app(copy.deepcopy(msg), self.contexts[msg.metadata.dst_node_id])
            except Exception as exc:  # as Flower's runtime does: the site's exception becomes an error reply
                from flwr.app import Error

                self._replies[msg_id] = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(list(self.push_messages(messages)))


def _lost(msg: Message) -> bool:
    """FEDCLIP_TEST_LOSE="node:round": that node is gone from that round's train message on (the
    SuperLink replies for it that the node is unavailable, as Flower's does after its heartbeat stops)."""
    spec = os.environ.get("FEDCLIP_TEST_LOSE", "")
    if not spec or not msg.metadata.message_type.startswith("train"):
        return False
    node, round_ = (int(x) for x in spec.split(":"))
    config = msg.content.config_records.get("config", {})
    return msg.metadata.dst_node_id == node and int(config.get("server-round", 0)) >= round_


def _dropping(spec: str):
    """The ClientApp, with one site raising at one stage of one round's secure sum, as a site lost
    there would leave the server (an error reply, then no more messages for it that round)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    nodes, stage, round_ = spec.split(":")
    dropped = {int(n) for n in nodes.split(",")}

    def app(msg, context):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if (
            configs is not None
            and context.node_id in dropped
            and configs.get(Key.STAGE) == stage
            and msg.metadata.group_id == round_
        ):
            raise RuntimeError(f"site at node {context.node_id} lost at the {stage} stage of round {round_}")
        return client_app(msg, context)

    return app


def run_local(out, cache, config: str, *, env: dict | None = None, timeout: float = 600):
    """This module as a process (a crash must not take the test with it): ``config`` as run-config
    overrides, ``env`` the fault-injection variables. Returns the finished ``subprocess.CompletedProcess``."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "tests.faults.local_grid", str(out), str(cache), config],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def main(argv: list[str]) -> int:
    out, cache, extra = argv
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    cfg = resolve_config(default_run_config(), {**parse_run_config(extra), "output-dir": out, "cache-dir": cache})
    # FEDCLIP_TEST_EXTRA_NODES: SuperNodes beyond the sites (a node no site is planned for: discovery fails)
    # FEDCLIP_TEST_DROP="node:stage:round": that site dies at that SecAgg+ stage (Flower's name) of that round
    # FEDCLIP_TEST_LOSE="node:round": that site's SuperNode is gone from that round on (no reply)
    app = _dropping(os.environ["FEDCLIP_TEST_DROP"]) if os.environ.get("FEDCLIP_TEST_DROP") else None
    run(LocalGrid(cfg.num_sites + int(os.environ.get("FEDCLIP_TEST_EXTRA_NODES", "0")), app=app), cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
