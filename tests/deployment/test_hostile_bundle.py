"""A dishonest coordinator's bundle at a hospital set up with ``fedclip site-setup`` (issue 30).

Real processes on loopback: a SuperLink with TLS and SuperNode authentication; the hospital's
worker as the data owner (root here), its SuperNode as the node user and its SuperExec with every
ClientApp as the app user (``fedclip site-start``, users made by ``site-setup --create-users``).
The coordinator ships ``hostile_app`` (its ServerApp sends honest round plans, its ClientApp tries
what the plan's ``attack`` says) and the test reads what reached the coordinator. First, the setup:
the files' owners and modes, and ``site-start supernode`` refused while another user can read the
manifest or no worker answers. Then the attacks:

(a) opening the manifest, an image, the ledger or the node key: a permission error each, the round
    fails at the site with the error in the coordinator's reply;
(b) asking the worker for a non-private round, seeded noise, less noise or a larger sample rate:
    refused, naming the site's rule;
(c) asking for the same round a hundred times: every answered attempt is charged, and the site's
    total cap stops it;
(d) changing the worker's reply: only post-processing of what the worker released; the ledger holds
    exactly one charge for it.

Nothing the coordinator received holds a patient's name or caption or a file's bytes.
"""

from __future__ import annotations

import json
import os
import pwd
import sqlite3
import stat
import subprocess
from pathlib import Path

import pandas as pd

from fedclip.privacy.events import DpEvent
from fedclip.privacy.ledger import PrivacyLedger
from simulations.loopback import BIN, REPO, Federation, free_port, make_certificates, wait_for
from tests.deployment.consortium import make_consortium

HOSTILE = Path(__file__).parent / "hostile_app"
CAP_RUN, CAP_TOTAL = 4.0, 3.1  # the hospital's caps: one round of small.toml costs 2.1, a round at sample rate 1 8.4


def _fedclip(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fedclip"), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _check_modes(hospital: Path, run: Path, *, node_user: str, app_user: str) -> None:
    """What site-setup set: the data the owner's alone, each user's Flower home its own."""
    for path, user, mode in (
        (hospital / "manifest.csv", "root", 0o600),
        (hospital, "root", 0o700),
        (hospital / "state", "root", 0o700),
        (run, "root", 0o711),
        (run / "node", node_user, 0o700),
        (run / "node" / "node.key", node_user, 0o600),
        (run / "app", app_user, 0o700),
        (run / "app" / "superexec.secret", app_user, 0o600),
    ):
        info = path.stat()
        assert (pwd.getpwuid(info.st_uid).pw_name, stat.S_IMODE(info.st_mode)) == (user, mode), path


def test_a_hostile_bundle_takes_nothing_outside_the_accounted_mechanism(
    open_root: Path, site_users: tuple[str, str], reachable_installation: None
):
    node_user, app_user = site_users
    data = make_consortium(open_root / "data", open_root)  # under a folder other users may pass through
    parties = data["server"].parent.parent
    hospital = parties / "hospital_0"
    own = (hospital / "node-config.txt").read_text()
    own = own.replace(
        "max-epsilon-run=10.0 max-epsilon-total=10.0", f"max-epsilon-run={CAP_RUN} max-epsilon-total={CAP_TOTAL}"
    )
    (hospital / "node-config.txt").write_text(own)
    rows = pd.read_csv(hospital / "manifest.csv", keep_default_na=False)
    certs = make_certificates(open_root / "certs", ("hospital_0",))
    run = open_root / "run0"

    fed = Federation(open_root / "federation", certs=certs)
    try:
        fed.superlink()
        fed.register("hospital_0")
        setup = _fedclip(
            "site-setup",
            "--node-config-file",
            str(hospital / "node-config.txt"),
            "--run-dir",
            str(run),
            "--superlink",
            f"127.0.0.1:{fed.port}",
            "--node-user",
            node_user,
            "--app-user",
            app_user,
            "--root-certificates",
            str(certs / "ca.crt"),
            "--node-key",
            str(certs / "hospital_0.key"),
            "--runtime-port",
            str(free_port()),
            "--create-users",
        )
        assert setup.returncode == 0 and "NOT SEPARATED" not in setup.stdout, setup.stdout + setup.stderr[-2000:]
        assert f"fedclip site-start supernode {run}   # runs as {node_user}" in setup.stdout
        _check_modes(hospital, run, node_user=node_user, app_user=app_user)
        # the SuperNode is refused while another user can read the manifest, and while no worker answers
        os.chmod(hospital, 0o755)
        os.chmod(hospital / "manifest.csv", 0o644)
        check = _fedclip("site-start", "supernode", str(run), "--check")
        for user in (node_user, app_user):
            assert f"OS user {user!r} can read the manifest {hospital / 'manifest.csv'}" in check.stderr, check.stderr
        os.chmod(hospital, 0o700)
        os.chmod(hospital / "manifest.csv", 0o600)
        check = _fedclip("site-start", "supernode", str(run), "--check")
        assert check.returncode != 0 and "no worker answers" in check.stderr, check.stderr
        worker = fed._start("worker", [str(BIN / "fedclip"), "site-start", "worker", str(run)])
        wait_for(worker, "listening on", timeout=120)
        sock = (run / "worker.sock").stat()  # the app user's group may connect, nobody else
        assert stat.S_IMODE(sock.st_mode) == 0o660 and sock.st_gid == pwd.getpwnam(app_user).pw_gid
        node = fed._start("supernode", [str(BIN / "fedclip"), "site-start", "supernode", str(run)])
        wait_for(node, "SuperNode ID", timeout=120)
        fed._start("superexec", [str(BIN / "fedclip"), "site-start", "superexec", str(run)])

        ledger = hospital / "state" / "ledger.sqlite"
        image = Path(hospital / rows["filepath"].iloc[0])
        attacks = [
            {
                "kind": "weaker",
                "plans": {
                    "nonprivate": {"dp-mode": "nonprivate"},
                    "seeded-noise": {"reproducible-noise": True},
                    "less-noise": {"noise-multiplier": 0.1},
                    "more-sampling": {"sample-rate": 1.0},
                },
            },
            {"kind": "tamper"},
            {"kind": "replay", "times": 100},
            {
                "kind": "read",
                "paths": [str(hospital / "manifest.csv"), str(image), str(ledger), str(run / "node" / "node.key")],
            },
        ]
        loot_dir = open_root / "loot"
        config = open_root / "hostile.toml"
        config.write_text(
            f"loot-dir = '{loot_dir}'\npretrained = '{parties / 'coordinator' / 'base.pt'}'\n"
            f"manifest = '{parties / 'coordinator' / 'manifest.csv'}'\n"
            f"attacks = '''{json.dumps(attacks)}'''\n"
        )
        job = fed.run(config, app=HOSTILE, timeout=900)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    finally:
        fed.stop()

    loot = json.loads((loot_dir / "loot.json").read_text())
    by_kind = {entry["attack"]["kind"]: entry for entry in loot}
    logs = {name: (fed.root / f"{name}.log").read_text() for name in ("worker", "supernode", "superexec")}

    # (b) every weaker round refused by the worker, naming the rule
    weaker = json.loads(by_kind["weaker"]["configs"]["loot"]["json"])
    rules = {
        "nonprivate": "allowed-dp-modes",
        "seeded-noise": "reproducible-noise",
        "less-noise": "min-noise-multiplier",
        "more-sampling": "max-epsilon-run",
    }
    for name, rule in rules.items():
        assert weaker[name].startswith("refused") and rule in weaker[name], (name, weaker[name])
    assert "arrays" not in by_kind["weaker"]["arrays"]

    # (c) replays: each answered one charged, then the site's total cap
    replay = json.loads(by_kind["replay"]["configs"]["loot"]["json"])
    assert replay["answered"] >= 1 and "max-epsilon-total" in replay["refusal"], replay
    with sqlite3.connect(ledger) as db:
        charges = db.execute("SELECT run, status, event FROM charges ORDER BY id").fetchall()
    training = [c for c in charges if DpEvent.from_json(c[2]).steps > 0]
    assert len(training) == 1 + replay["answered"]  # the tampered round, and every answered replay
    assert {c[1] for c in charges} == {"confirmed"}
    assert logs["worker"].count("train: answered") == 1 + replay["answered"]
    events = [DpEvent.from_json(c[2]) for c in charges]
    spent = PrivacyLedger(delta=1e-5, accountant="prv", events=tuple(events)).epsilon()
    one_more = PrivacyLedger(delta=1e-5, accountant="prv", events=tuple(events) + (events[-1],)).epsilon()
    assert spent <= CAP_TOTAL < one_more, (spent, one_more)

    spending = (hospital / "state" / "spending.md").read_text()  # the site's own account names each refusal
    assert "policy refused (5; nothing charged)" in spending
    assert all(f"| {rule} |" in spending for rule in (*rules.values(), "max-epsilon-total"))

    # (d) the tampered reply is the worker's release, post-processed; charged once like an honest round
    tamper = by_kind["tamper"]
    assert set(tamper.get("arrays", ())) == {"arrays", "honest"}, tamper
    first = DpEvent.from_json(training[0][2])  # the tampered round's charge: the honest plan's, once
    assert (first.noise_multiplier, first.sample_rate, first.steps) == (1.0, 0.1, 3)
    assert len({c[0] for c in charges}) == 1 + replay["answered"]  # each replay a new run: the total cap binds

    # (a) every file refused to the app user; the round failed at the site, and the coordinator was told
    error = by_kind["read"]["error"]
    assert "PermissionError" in error and error.count("Permission denied") == 4, error

    # nothing of a patient reached the coordinator
    received = (loot_dir / "loot.json").read_text()
    for text in (*rows["name"].unique(), *rows["title"].unique()):
        assert text not in received
    assert (hospital / "manifest.csv").read_bytes().hex()[:64] not in received
    assert image.read_bytes().hex()[:64] not in received
    assert "SuperNode ID" in logs["supernode"] and "Start `flwr-clientapp` process" in logs["superexec"]
