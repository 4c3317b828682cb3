"""Kill a hospital's site worker at every phase of a round that writes its state, restart it, and
check the site's own ledger: the killed attempt's charge is never lost, and the retried round and
the next one are charged on top of it.

Real processes: ``fedclip site-worker`` killed with ``os._exit`` at the phase
(``FEDCLIP_CRASH_AT=site-charged:1`` and so on), the message handed over by the real ClientApp.
"""

import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedclip.models.arrays import model_to_arrays
from fedclip.models.factory import ModelConfig, create_model
from fedclip.privacy.events import events_from_wire
from fedclip.privacy.ledger_store import LedgerStore
from simulations.hospital_clip import client_app
from simulations.hospital_clip.config import SimulationConfig
from simulations.hospital_clip.server_app import train_config_record
from simulations.loopback import BIN, REPO
from strategies.faults import CRASH_EXIT_CODE, SITE_PHASES
from strategies.privacy_budget import PRIVACY_RECORD


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def send_train(round_: int, *, config, model, node: dict) -> Message:
    """Round ``round_``'s train message, handed to the real ClientApp as a SuperNode would."""
    config["server-round"] = round_
    msg = Message(
        RecordDict({"arrays": model_to_arrays(model, trainable_only=True), "config": config}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    return client_app(msg, Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={}))


def _worker(sock: Path, log: Path, crash: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if crash:
        env["FEDCLIP_CRASH_AT"] = crash
    proc = subprocess.Popen(
        [str(BIN / "fedclip"), "site-worker", "--site", "hospital_0", "--socket", str(sock)],
        cwd=REPO,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )
    deadline = time.time() + 120
    while "listening on" not in log.read_text():
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"worker did not start:\n{log.read_text()}")
        time.sleep(0.2)
    return proc


@pytest.mark.parametrize("phase", SITE_PHASES)
def test_a_killed_worker_loses_no_spending(phase, small_manifest_path, warm_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("crash", numbered=True)  # short: a Unix socket path has 108 bytes
    sock, state = root / "w.sock", root / "state"
    cfg = SimulationConfig(
        manifest=str(small_manifest_path),
        sites="hospital_0,hospital_1",
        declared_units=6,
        target_epsilon=0.0,
        local_steps=2,
        trainable="last-1",
    )
    config = train_config_record(cfg, noise_multiplier=1.0, manifest="", checkpoint="")
    model = create_model(ModelConfig(pretrained=str(warm_checkpoint), trainable="last-1")).model
    node = {
        "site": "hospital_0",
        "manifest": str(small_manifest_path),
        "checkpoint": str(warm_checkpoint),
        "state-dir": str(state),
        "declared-units": 6,
        "site-worker": str(sock),
    }

    def train(round_: int) -> Message:
        return send_train(round_, config=config, model=model, node=node)

    killed = _worker(sock, root / "killed.log", crash=f"{phase}:1")
    with pytest.raises(RuntimeError, match="site worker .*did not answer .*closed mid-message"):
        train(1)
    assert killed.wait(timeout=60) == CRASH_EXIT_CODE, (root / "killed.log").read_text()
    assert f"crashing at phase '{phase}' of round 1" in (root / "killed.log").read_text()

    worker = _worker(sock, root / "restarted.log")  # the killed worker's socket file is replaced
    try:
        retried, nxt = train(1), train(2)  # the server retries round 1, then goes on
    finally:
        worker.kill()
        worker.wait(timeout=60)
    per_round = len(events_from_wire(nxt.content[PRIVACY_RECORD]["events"]))

    with sqlite3.connect(state / "ledger.sqlite") as db:
        charges = db.execute("SELECT round, status FROM charges ORDER BY rowid").fetchall()
    crashed_status = "confirmed" if phase == "site-settled" else "pending"
    assert charges == [(1, crashed_status), (1, "confirmed"), (2, "confirmed")], charges
    store = LedgerStore(state / "ledger.sqlite", delta=cfg.delta, accountant=cfg.accountant, create=False)
    try:
        assert len(store.events("hospital_0")) == 3 * per_round  # the killed attempt counts in full
        spending = pd.read_csv(state / "spending.csv")
        assert spending["epsilon_total"].iloc[-1] == pytest.approx(store.ledger("hospital_0").epsilon())
    finally:
        store.close()
    assert not retried.has_error()
