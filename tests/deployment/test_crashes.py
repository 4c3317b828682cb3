"""Crashes of every party of a deployed run, on loopback (issue 30): in round 1 a hospital's worker
killed after charging and the other hospital's SuperNode killed while its worker trains; in round 2
of the resumed run the SuperLink killed; each restarted, the run resumed (``resume=true``) until it
finishes.

After each: the operator's command and ``fedclip status`` say what happened (exit 1 naming the site;
exit 0 once finished); at the end no round is counted twice in the run's tables, and for each
hospital the epsilon of its own ledger equals the server's for it: both charged every attempt
that either side began, killed ones included.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from fedclip.privacy.ledger_store import LedgerStore
from simulations.loopback import BIN, Federation, make_certificates, wait_for
from strategies.faults import CRASH_EXIT_CODE
from tests.deployment.consortium import run_config, site_node_config

# a site's worker waits 3 s after charging its ledger, before reading data: the window in which the
# test kills another party mid-round (a round here trains in a quarter of a second)
PAUSE = {"FEDCLIP_PAUSE_AT": "site-charged", "FEDCLIP_PAUSE_SECONDS": "3"}


def _charges(ledger: Path, round_: int | None = None) -> int:
    if not ledger.exists():
        return 0
    with sqlite3.connect(ledger) as db:
        if round_ is None:
            return db.execute("SELECT COUNT(DISTINCT round || '-' || attempt || run) FROM charges").fetchone()[0]
        return db.execute("SELECT COUNT(DISTINCT attempt || run) FROM charges WHERE round = ?", (round_,)).fetchone()[0]


def _until(predicate, *, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def _status(out: Path) -> tuple[int, dict]:
    done = subprocess.run([str(BIN / "fedclip"), "status", str(out)], capture_output=True, text=True, timeout=120)
    return done.returncode, json.loads(done.stdout or "{}")


def test_every_party_crashes_mid_round_and_the_resumed_run_loses_no_spending(hospital_data, tmp_path):
    out = tmp_path / "out"
    states = {k: tmp_path / f"state_{k}" for k in range(2)}
    sockets = {k: states[k] / "worker.sock" for k in range(2)}
    ledgers = {k: states[k] / "ledger.sqlite" for k in range(2)}
    server_ledger = out / "state" / "ledger.sqlite"
    # TLS and registered node keys, as a consortium runs: a restarted SuperNode keeps its node id
    fed = Federation(tmp_path / "federation", certs=make_certificates(tmp_path / "certs", ("hospital_0", "hospital_1")))
    nodes = {}

    def config(resume: bool) -> Path:  # a budget that failed attempts cannot exhaust: every attempt is charged
        extra = f"output-dir = '{out}'\nresume = {str(resume).lower()}\nbudget = 40.0\nround-timeout = 40.0\n"
        site_nodes = ",".join(f"hospital_{k}={nodes[k]}" for k in range(2))
        return run_config(tmp_path / "run.toml", hospital_data, out=out, extra=extra, site_nodes=site_nodes)

    def start_run(resume: bool, wait: float = 120) -> subprocess.Popen:
        return fed.start_job(config(resume), wait=wait)

    def supernode(k: int, name: str) -> None:
        """Start hospital_k's SuperNode, as its service manager would restart it: the SuperLink refuses
        a killed node's key until it misses two heartbeats (Flower's 30 s interval, fixed), and the
        SuperNode exits (code 305) until then."""
        own = site_node_config(f"hospital_{k}", hospital_data, states[k], worker=sockets[k])
        for attempt in range(20):
            log = fed.supernode(f"{name}-{attempt}", own, node_key=f"hospital_{k}", expect="SuperNode")
            _until(
                lambda: "SuperNode ID" in log.read_text() or "Exit Code: 305" in log.read_text(),
                timeout=60,
                what=f"{name} neither started nor exited",
            )
            if "SuperNode ID" in log.read_text():
                fed.named[name] = fed.named[f"{name}-{attempt}"]
                return
            time.sleep(5)
        raise AssertionError(f"{name} was never activated")

    try:
        fed.superlink(database=tmp_path / "superlink.db")
        nodes.update({k: fed.register(f"hospital_{k}") for k in range(2)})
        # 1. in round 1, hospital_0's worker dies after charging its ledger (before reading data), and
        #    hospital_1's SuperNode is killed while its worker trains: the round fails at both
        fed.site_worker("hospital_0", sockets[0], name="worker_0", env={"FEDCLIP_CRASH_AT": "site-charged:1"})
        fed.site_worker("hospital_1", sockets[1], name="worker_1", env=PAUSE)
        supernode(0, "supernode_0")
        supernode(1, "supernode_1")
        first = start_run(False)
        _until(lambda: _charges(ledgers[1]) > 0, timeout=300, what="hospital_1 never charged round 1")
        fed.kill("supernode_1")
        assert fed.named["worker_0"].wait(timeout=120) == CRASH_EXIT_CODE
        fed.site_worker("hospital_0", sockets[0], name="worker_0b", env=PAUSE)
        supernode(1, "supernode_1b")  # about a minute: the SuperLink's patience with the killed node
        output = first.communicate(timeout=600)[0]
        assert first.returncode == 1, output[-3000:]
        code, status = _status(out)
        assert code == 1, status
        trouble = status["sites-not-trained"]
        assert trouble["hospital_0"]["failed"] == 1 and "did not answer" in trouble["hospital_0"]["last"]["reason"]
        assert trouble["hospital_1"]["lost"] == 1, trouble

        # 2. resumed: round 1 again, then the SuperLink killed once both hospitals charged round 2;
        #    restarted on its database
        second = start_run(True, wait=5)
        _until(lambda: all(_charges(ledgers[k], 2) for k in range(2)), timeout=600, what="round 2 was never charged")
        fed.kill("superlink")
        output = second.communicate(timeout=300)[0]
        assert second.returncode != 0, output[-3000:]
        # not finished: status.json says running (the ServerApp died with the SuperLink) or failed (it saw
        # the connection end), never finished
        code, status = _status(out)
        assert code in (1, 3) and status["status"] != "finished", status
        fed.superlink(database=tmp_path / "superlink.db", name="superlink_b")

        # 3. resumed once more: it finishes
        third = fed.run(config(True), timeout=600)
        assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    finally:
        fed.stop()

    code, status = _status(out)
    assert code == 0 and status["status"] == "finished" and status["rounds"] == status["trained-rounds"] == 2, status
    rounds = pd.read_csv(out / "rounds.csv")
    trained = rounds[rounds["status"] == "trained"]
    assert sorted(zip(trained["round"], trained["site"])) == [
        (1, "hospital_0"),
        (1, "hospital_1"),
        (2, "hospital_0"),
        (2, "hospital_1"),
    ]  # each round once in the run's tables
    server = LedgerStore(server_ledger, delta=1e-5, create=False)
    for k in range(2):
        site = f"hospital_{k}"
        own = LedgerStore(ledgers[k], delta=1e-5, create=False)
        # every attempt either side began is charged on both: 2 of each round
        assert _charges(ledgers[k], 1) == 2 and _charges(ledgers[k], 2) == 2, own.rows()
        assert own.events(site) == server.events(site)
        assert own.ledger(site).epsilon() == pytest.approx(server.ledger(site).epsilon(), rel=1e-9)
        own.close()
    server.close()
    wait_for(fed.root / "worker_0b.log", "train: answered", timeout=1)
