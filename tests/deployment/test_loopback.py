"""The app on Flower's deployment runtime, as a consortium starts it: a SuperLink and two SuperNodes
(real processes on loopback), each hospital with its own node config, and ``flwr run``; insecure,
and with TLS plus SuperNode authentication (certificate authority, server certificate and node
keys made by the test; nodes registered with ``flwr supernode register``).

The server holds only public and held-out rows (``sites`` declared in the run config), each
hospital only its own members, and the auditor the attack's targets: the split a consortium has.
Bounded in time; every process is stopped by the test.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from fedclip.data.synthetic import SyntheticConfig, generate
from fedclip.training.warmstart import WarmStartConfig, warm_start

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DATA = SyntheticConfig(seed=3, num_sites=2, patients_per_site=6, public_patients=12, heldout_patients=4,
                       images_per_patient=4, query_images_per_patient=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(home),
            "OMP_NUM_THREADS": "1"}


def _wait_for(log: Path, text: str, *, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.is_file() and text in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{text!r} not in {log} after {timeout:.0f}s:\n{log.read_text(errors='replace')[-2000:]}")


class Federation:
    """A SuperLink and SuperNodes started as processes; ``stop`` kills every process group."""

    def __init__(self, root: Path, *, certs: Path | None = None):
        self.root, self.procs, self.certs = root, [], certs
        self.home = root / "flwr-home"
        self.home.mkdir(parents=True)
        self.port = _free_port()
        security = "insecure = true\n" if certs is None else f'root-certificates = "{certs / "ca.crt"}"\n'
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{self.port}"\n' + security)

    def _security(self, *, node_key: str | None = None) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        if node_key is None:  # the SuperLink: TLS, and only registered SuperNodes may connect
            return ["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "server.pem"),
                    "--ssl-keyfile", str(self.certs / "server.key"), "--enable-supernode-auth"]
        return ["--root-certificates", str(self.certs / "ca.crt"),
                "--auth-supernode-private-key", str(self.certs / f"{node_key}.key")]

    def register(self, node_key: str) -> int:
        """Register a node's public key; returns the node id the SuperLink gave it."""
        done = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(self.certs / f"{node_key}.pub"), "loopback",
                               "--format", "json"], env=_env(self.home), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return int(json.loads(done.stdout)["node-id"])

    def _start(self, name: str, args: list[str]) -> Path:
        log = self.root / f"{name}.log"
        cwd = self.root / name
        cwd.mkdir(exist_ok=True)
        with log.open("w") as out:
            self.procs.append(subprocess.Popen(args, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=_env(self.home),
                                               start_new_session=True))
        return log

    def superlink(self) -> None:
        log = self._start("superlink", [str(BIN / "flower-superlink"), *self._security(), "--port", str(self.port),
                                        "--disable-runtime-dependency-installation"])
        _wait_for(log, "Uvicorn running", timeout=60)

    def supernode(self, name: str, node_config: str | None, *, node_key: str | None = None,
                  expect: str = "SuperNode ID") -> Path:
        args = [str(BIN / "flower-supernode"), *self._security(node_key=node_key),
                "--superlink", f"127.0.0.1:{self.port}", "--port", str(_free_port())]
        if node_config is not None:
            args += ["--node-config", node_config]
        log = self._start(name, args)
        _wait_for(log, expect, timeout=60)
        return log

    def run(self, run_config: Path, *, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), "run", ".", "loopback", "--run-config", str(run_config), "--stream"],
                              cwd=REPO, env=_env(self.home), capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=30)


def make_certificates(folder: Path, nodes: tuple[str, ...]) -> Path:
    """A certificate authority, a SuperLink certificate for 127.0.0.1/localhost, and an ECDSA key
    pair per SuperNode (OpenSSH format, as ``flwr supernode register`` expects)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    def certificate(subject: str, key, issuer: str, signer, *extensions):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(validity[0]).not_valid_after(validity[1]))
        for ext, critical in extensions:
            b = b.add_extension(ext, critical=critical)
        return b.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    ca_key, server_key = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    (folder / "ca.crt").write_bytes(certificate("fedclip test CA", ca_key, "fedclip test CA", ca_key,
                                                (x509.BasicConstraints(ca=True, path_length=None), True)))
    names = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    (folder / "server.pem").write_bytes(certificate("localhost", server_key, "fedclip test CA", ca_key, (names, False)))
    (folder / "server.key").write_bytes(server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    for node in nodes:
        key = ec.generate_private_key(ec.SECP384R1())
        (folder / f"{node}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
        (folder / f"{node}.pub").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return folder


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path / "federation")
    try:
        yield fed
    finally:
        fed.stop()


@pytest.fixture(scope="module")
def hospital_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The data as a consortium holds it: the server's manifest (public and held-out rows), one per
    hospital (its own members; hospital_1's without a site column, as a hospital's export would
    be), the auditor's (members' query photos, non-members' photos), and the base checkpoint."""
    manifest = generate(tmp_path_factory.mktemp("deployed_data"), DATA)
    frame = pd.read_csv(manifest, keep_default_na=False)
    parts = {"server": frame[frame["split"].isin(["public", "heldout"])],
             "auditor": frame[frame["split"].isin(["query", "heldout"])]}
    for k in range(2):
        own = frame[(frame["split"] == "train") & (frame["site"] == f"hospital_{k}")]
        parts[f"hospital_{k}"] = own.assign(site="") if k == 1 else own
    paths = {}
    for role, rows in parts.items():
        paths[role] = manifest.with_name(f"{role}.csv")
        rows.to_csv(paths[role], index=False)
    paths["checkpoint"] = warm_start(paths["server"], cache_dir=tmp_path_factory.mktemp("deployed_cache"),
                                     config=WarmStartConfig(epochs=3, batch_size=32, seed=0))
    return paths


def _run_config(path: Path, data: dict[str, Path], *, out: Path, site_nodes: str = "") -> Path:
    small = (REPO / "simulations" / "hospital_clip" / "small.toml").read_text().splitlines()
    kept = [line for line in small if not line.startswith(("output-dir", "cache-dir"))]
    path.write_text("\n".join(kept) + f"\nmanifest = '{data['server']}'\npretrained = '{data['checkpoint']}'\n"
                    f"output-dir = '{out}/{{run-id}}'\ncache-dir = '{out.parent / 'cache'}'\ndeclared-units = 6\n"
                    f"sites = 'hospital_0,hospital_1'\nsite-nodes = '{site_nodes}'\n")
    return path


def _site(name: str, data: dict[str, Path], state: Path) -> str:
    return f"site='{name}' manifest='{data[name]}' checkpoint='{data['checkpoint']}' state-dir='{state}' declared-units=6"


def _fedclip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fedclip"), *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def _two_rounds_at_two_hospitals(fed: Federation, data: dict[str, Path], tmp_path: Path, *,
                                 keys: tuple[str | None, str | None] = (None, None), site_nodes: str = "") -> Path:
    for k in range(2):
        fed.supernode(f"hospital_{k}", _site(f"hospital_{k}", data, tmp_path / f"state_{k}"), node_key=keys[k])
    done = fed.run(_run_config(tmp_path / "run.toml", data, out=tmp_path / "out", site_nodes=site_nodes))
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
    # the server attacked nothing (it holds no targets) but kept every round's model for the auditor
    assert not (out / "attack.csv").exists() and (out / "summary.md").is_file()
    assert sorted(p.name for p in (out / "models").iterdir()) == ["round_000.pt", "round_001.pt", "round_002.pt"]
    audit = _fedclip("audit", str(out), "--targets", str(data["auditor"]))
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-3000:]
    attack = pd.read_csv(out / "audit" / "attack.csv")
    assert list(attack["round"]) == [0, 1, 2]
    assert set(attack["members"]) == {12} and set(attack["non_members"]) == {4}
    assert (out / "audit" / "attack.png").is_file() and (out / "audit" / "summary.md").is_file()
    return out


def test_two_hospitals_train_two_rounds_on_the_deployment_runtime(federation, hospital_data, tmp_path):
    federation.superlink()
    _two_rounds_at_two_hospitals(federation, hospital_data, tmp_path)


def test_with_tls_and_supernode_authentication_an_unregistered_node_is_refused(hospital_data, tmp_path):
    certs = make_certificates(tmp_path / "certs", ("hospital_0", "hospital_1", "intruder"))
    fed = Federation(tmp_path / "federation", certs=certs)
    try:
        fed.superlink()
        nodes = {f"hospital_{k}": fed.register(f"hospital_{k}") for k in range(2)}
        # a node whose key the SuperLink does not know is turned away before it can join any run
        log = fed.supernode("intruder", None, node_key="intruder", expect="2004")
        assert "Failed to activate SuperNode" in log.read_text(errors="replace")
        # the server knows each hospital by the node id its registered key was given, not by its word
        out = _two_rounds_at_two_hospitals(fed, hospital_data, tmp_path, keys=("hospital_0", "hospital_1"),
                                           site_nodes=",".join(f"{s}={n}" for s, n in nodes.items()))
        assert json.loads((out / "config.json").read_text())["site-nodes"].count("=") == 2
    finally:
        fed.stop()


def test_a_supernode_without_node_config_is_refused(federation, hospital_data, tmp_path):
    federation.superlink()
    federation.supernode("hospital_0", _site("hospital_0", hospital_data, tmp_path / "state_0"))
    federation.supernode("bare", None)
    out = tmp_path / "out"
    done = federation.run(_run_config(tmp_path / "run.toml", hospital_data, out=out))
    text = done.stdout + done.stderr
    assert "neither 'site'" in text and "partition-id" in text, text[-3000:]
    assert not list(out.glob("*/rounds.csv")) or all(pd.read_csv(p).empty for p in out.glob("*/rounds.csv"))
