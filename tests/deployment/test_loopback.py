"""The app on Flower's deployment runtime, as a consortium starts it: a SuperLink and two SuperNodes
(real processes on loopback), each hospital with its own node config, and ``fedclip job`` (``flwr
run``, then the run's final status at the SuperLink as the exit status); insecure,
and with TLS plus SuperNode authentication (certificate authority, server certificate and node
keys made by the test; nodes registered with ``flwr supernode register``).

The server holds only public and held-out rows (``sites`` declared in the run config), each
hospital only its own members, and the auditor the attack's targets: the split a consortium has.
Bounded in time; every process is stopped by the test.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from simulations.loopback import BIN, REPO, Federation, make_certificates
from tests.deployment.consortium import run_config, site_node_config


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path / "federation")
    try:
        yield fed
    finally:
        fed.stop()


def _fedclip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fedclip"), *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def _two_rounds_at_two_hospitals(
    fed: Federation,
    data: dict[str, Path],
    tmp_path: Path,
    *,
    keys: tuple[str | None, str | None] = (None, None),
    site_nodes: str = "",
    worker_at: tuple[int, ...] = (),
) -> Path:
    """``worker_at``: the hospitals whose ClientApp hands each message to their ``fedclip site-worker``."""
    workers = {k: fed.site_worker(f"hospital_{k}", tmp_path / f"state_{k}" / "worker.sock") for k in worker_at}
    for k in range(2):
        worker = tmp_path / f"state_{k}" / "worker.sock" if k in workers else None
        fed.supernode(
            f"hospital_{k}",
            site_node_config(f"hospital_{k}", data, tmp_path / f"state_{k}", worker=worker),
            node_key=keys[k],
        )
    done = fed.run(run_config(tmp_path / "run.toml", data, out=tmp_path / "out", site_nodes=site_nodes))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (out,) = list((tmp_path / "out").iterdir())  # output-dir = '.../{run-id}': one folder per run
    assert out.name.isdigit(), out
    status = _fedclip("status", str(out))
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "finished", status.stdout + status.stderr
    rounds = pd.read_csv(out / "rounds.csv")
    trained = rounds[rounds["status"] == "trained"]
    assert sorted(trained["site"].unique()) == ["hospital_0", "hospital_1"]
    assert sorted(trained["round"].unique()) == [1, 2]
    config = json.loads((out / "config.json").read_text())
    assert config["sites"] == "hospital_0,hospital_1" and config["resolved-manifest"] == str(data["server"])
    # each hospital keeps its own durable ledger where its node config says, with both rounds in it,
    # its own readable account of its spending, and its preprocessed data cached for the next process
    for k in range(2):
        state = tmp_path / f"state_{k}"
        ledger = state / "ledger.sqlite"
        assert ledger.is_file(), f"hospital_{k} kept no ledger"
        with sqlite3.connect(ledger) as db:
            charges = db.execute("SELECT site, round, status FROM charges ORDER BY round").fetchall()
        assert [(site, r) for site, r, _ in charges] == [(f"hospital_{k}", 1), (f"hospital_{k}", 2)], charges
        assert {status for *_, status in charges} == {"confirmed"}, charges
        spending = pd.read_csv(state / "spending.csv")
        assert list(spending["round"]) == [1, 2] and spending["epsilon_total"].is_monotonic_increasing
        server_eps = rounds[(rounds["site"] == f"hospital_{k}") & (rounds["round"] == 2)]["epsilon"].iloc[0]
        assert abs(spending["epsilon_total"].iloc[-1] - server_eps) < 1e-6 * max(1.0, server_eps)
        assert len(list((state / "cache").glob("pairs-*.pt"))) == 1
    for k, log in workers.items():  # the worker, not a fresh ClientApp process, answered every message
        lines = log.read_text()
        assert lines.count("train: answered") == 2 and lines.count("query: answered") == 1, lines[-3000:]
    # the server attacked nothing (it holds no targets) but kept every round's model for the auditor
    assert not (out / "attack.csv").exists() and (out / "summary.md").is_file()
    assert sorted(p.name for p in (out / "models").iterdir()) == ["round_000.pt", "round_001.pt", "round_002.pt"]
    audit = _fedclip("audit", str(out), "--targets", str(data["auditor"]))
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-3000:]
    attack = pd.read_csv(out / "audit" / "attack.csv")
    # names and photos only (no training pairs): IDIA and the attack on people, not the one on records
    assert "lira-record: not run" in audit.stdout
    assert sorted(set(attack["attack"])) == ["idia", "lira-patient"]
    for _, rows in attack.groupby("attack"):
        assert list(rows["round"]) == [0, 1, 2]
    assert set(attack["members"]) == {12} and set(attack["non_members"]) == {4}
    assert (out / "audit" / "attack.png").is_file() and (out / "audit" / "summary.md").is_file()
    return out


def test_with_tls_and_supernode_authentication_across_machines(hospital_data, tmp_path):
    """As a consortium across machines: the coordinator's SuperLink bound to one address (127.0.0.2,
    standing for the coordinator's host: ``--host``) and unreachable elsewhere, the hospitals and the
    operator dialling it under TLS with a certificate that names it, SuperNode authentication
    turning an unregistered node away; a certificate from the same authority naming another host
    is refused at the handshake. hospital_0 runs a site worker, hospital_1 answers in each message's
    own ClientApp process (both ways a hospital runs, in one federation)."""
    certs = make_certificates(
        tmp_path / "certs",
        ("hospital_0", "hospital_1", "intruder"),
        names=("superlink.consortium.test", "127.0.0.2"),
        other_servers={"misnamed": ("localhost", "127.0.0.1")},  # the same authority, another host's name
    )
    fed = Federation(tmp_path / "federation", certs=certs, host="127.0.0.2")
    try:
        fed.superlink()
        with socket.socket() as probe:  # bound to the address it was given, not every interface
            assert probe.connect_ex(("127.0.0.1", fed.port)) != 0
        nodes = {f"hospital_{k}": fed.register(f"hospital_{k}") for k in range(2)}
        # a node whose key the SuperLink does not know is turned away before it can join any run
        log = fed.supernode("intruder", None, node_key="intruder", expect="2004")
        assert "Failed to activate SuperNode" in log.read_text(errors="replace")
        # the server knows each hospital by the node id its registered key was given, not by its word
        out = _two_rounds_at_two_hospitals(
            fed,
            hospital_data,
            tmp_path,
            keys=("hospital_0", "hospital_1"),
            site_nodes=",".join(f"{s}={n}" for s, n in nodes.items()),
            worker_at=(0,),
        )
        assert json.loads((out / "config.json").read_text())["site-nodes"].count("=") == 2
        assert _flwr_ls(fed).returncode == 0
    finally:
        fed.stop()
    misnamed = Federation(tmp_path / "misnamed", certs=certs, host="127.0.0.2", server="misnamed")
    try:
        misnamed.superlink()
        listed = _flwr_ls(misnamed)
        assert listed.returncode != 0, listed.stdout + listed.stderr
    finally:
        misnamed.stop()


def _flwr_ls(fed: Federation) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "flwr"), "ls", "loopback"],
        cwd=REPO,
        env={**os.environ, "FLWR_HOME": str(fed.home)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_refusal_and_a_broken_manifest_fail_the_operators_command_naming_each_hospital(
    federation, hospital_data, tmp_path
):
    """hospital_0 caps a run at epsilon 0.01 and refuses round 1; hospital_1's manifest names an
    image that is not there. The run fails, and ``fedclip job`` exits 1 (``flwr run --stream``
    alone exits 0) naming each hospital: hospital_0 with its rule, hospital_1 with the manifest line
    and the kind of problem, never the hospital's paths or file names (its own errors.log has the
    detail). One federation for both: each is a hospital's answer to the same round."""
    broken = tmp_path / "hospital_1" / "manifest.csv"
    broken.parent.mkdir()
    rows = pd.read_csv(hospital_data["hospital_1"], keep_default_na=False)
    secret = "P99999_record_4711.png"
    rows.loc[2, "filepath"] = str(Path(rows.loc[2, "filepath"]).with_name(secret))
    rows.to_csv(broken, index=False)
    for image in Path(hospital_data["hospital_1"]).parent.iterdir():  # the images beside the manifest
        if image.name != "manifest.csv":
            (broken.parent / image.name).symlink_to(image)
    federation.superlink()
    logs = []
    for k in range(2):
        policy = " max-epsilon-run=0.01" if k == 0 else ""
        data = {**hospital_data, "hospital_1": broken}
        site = site_node_config(f"hospital_{k}", data, tmp_path / f"state_{k}") + policy
        logs.append(federation.supernode(f"hospital_{k}", site))
    done = federation.run(run_config(tmp_path / "run.toml", hospital_data, out=tmp_path / "out"))
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fedclip job: run ") and "hospital_0 refused" in last and "max-epsilon-run" in last, last
    assert "hospital_1" in last and "line 4" in last, last
    seen = done.stdout + done.stderr
    leaks = [line for line in seen.splitlines() if secret in line or str(broken.parent) in line]
    assert not leaks, leaks
    assert secret in (tmp_path / "state_1" / "errors.log").read_text()  # the detail stays at the hospital
    # each hospital's log states its policy as the run started: hospital_1 set none and is capped at 10
    assert "hospital_1's privacy policy: " in logs[1].read_text(errors="replace")
    assert "max-epsilon-run=10 (default) max-epsilon-total=10 (default)" in logs[1].read_text(errors="replace")
    assert "max-epsilon-run=0.01 max-epsilon-total=10 (default)" in logs[0].read_text(errors="replace")
    (out,) = list((tmp_path / "out").iterdir())
    assert _fedclip("status", str(out)).returncode == 1


def test_two_hospitals_run_distributed_dp_over_secure_aggregation_on_the_deployment_runtime(
    federation, hospital_data, tmp_path
):
    """dp-mode distributed on real SuperLink and SuperNodes: Flower's SecAgg+ stages cross the
    deployment runtime (a fresh ClientApp process per message keeps the protocol's state in the
    node's context); each hospital opts in by its own policy and charges its own ledger."""
    federation.superlink()
    for k in range(2):
        site = site_node_config(f"hospital_{k}", hospital_data, tmp_path / f"state_{k}")
        federation.supernode(f"hospital_{k}", f"{site} allowed-dp-modes='distributed'")
    config = run_config(tmp_path / "run.toml", hospital_data, out=tmp_path / "out")
    config.write_text(
        config.read_text().replace("local-steps = 3", "local-steps = 1")
        + "dp-mode = 'distributed'\nsample-rate = 0.5\ntarget-epsilon = 8.0\nbudget = inf\n"
    )
    done = federation.run(config)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (out,) = list((tmp_path / "out").iterdir())
    assert json.loads((out / "status.json").read_text())["status"] == "finished"
    report = json.loads((out / "distributed.json").read_text())
    assert report["sums"] == 2 and report["epsilon"]["server"] <= 8.0
    assert report["epsilon"]["server"] < report["epsilon"]["own-share"]
    rounds = pd.read_csv(out / "rounds.csv")
    assert (rounds["status"] == "trained").sum() == 4
    for k in range(2):
        with sqlite3.connect(tmp_path / f"state_{k}" / "ledger.sqlite") as db:
            events = [json.loads(e) for (e,) in db.execute("SELECT event FROM charges ORDER BY round")]
        assert [e["mechanism"] for e in events] == ["skellam", "skellam"]
