"""A consortium on one machine: a SuperLink and SuperNodes started as processes on loopback.

For tests, benchmarks and a first try of the deployment runtime before the real one (docs/federation.md,
"Running as a consortium"): ports are free ones, ``$FLWR_HOME/config.toml`` is written for a
connection named ``loopback``, and ``stop`` kills every process group it started. With
``certs`` (``make_certificates``) the SuperLink uses TLS and admits registered SuperNodes only.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "OMP_NUM_THREADS": "1",
    }


def wait_for(log: Path, text: str, *, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.is_file() and text in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{text!r} not in {log} after {timeout:.0f}s:\n{log.read_text(errors='replace')[-2000:]}")


class Federation:
    """A SuperLink and SuperNodes started as processes; ``stop`` kills every process group."""

    def __init__(
        self, root: Path, *, certs: Path | None = None, host: str = "127.0.0.1", dial: str = "", server: str = "server"
    ):
        """``host``: the address the SuperLink listens on (as ``--host`` on the coordinator's machine);
        ``dial``: the name or address the parties connect to (default ``host``), which the SuperLink's
        certificate (``certs/<server>.pem``) must name."""
        self.root, self.procs, self.certs, self.server = root, [], certs, server
        self.named: dict[str, subprocess.Popen] = {}
        self.host, self.dial = host, dial or host
        self.home = root / "flwr-home"
        self.home.mkdir(parents=True)
        self.port = free_port(host)
        security = "insecure = true\n" if certs is None else f'root-certificates = "{certs / "ca.crt"}"\n'
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "{self.dial}:{self.port}"\n'
            + security
        )

    def _security(self, *, node_key: str | None = None) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        if node_key is None:  # the SuperLink: TLS, and only registered SuperNodes may connect
            return [
                "--ssl-ca-certfile",
                str(self.certs / "ca.crt"),
                "--ssl-certfile",
                str(self.certs / f"{self.server}.pem"),
                "--ssl-keyfile",
                str(self.certs / f"{self.server}.key"),
                "--enable-supernode-auth",
            ]
        return [
            "--root-certificates",
            str(self.certs / "ca.crt"),
            "--auth-supernode-private-key",
            str(self.certs / f"{node_key}.key"),
        ]

    def register(self, node_key: str) -> int:
        """Register a node's public key; returns the node id the SuperLink gave it."""
        done = subprocess.run(
            [
                str(BIN / "flwr"),
                "supernode",
                "register",
                str(self.certs / f"{node_key}.pub"),
                "loopback",
                "--format",
                "json",
            ],
            env=_env(self.home),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return int(json.loads(done.stdout)["node-id"])

    def _start(self, name: str, args: list[str], *, env: dict[str, str] | None = None) -> Path:
        log = self.root / f"{name}.log"
        cwd = self.root / name
        cwd.mkdir(exist_ok=True)
        with log.open("w") as out:
            self.procs.append(
                subprocess.Popen(
                    args,
                    cwd=cwd,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**_env(self.home), **(env or {})},
                    start_new_session=True,
                )
            )
        self.named[name] = self.procs[-1]
        return log

    def kill(self, name: str) -> int:
        """Kill the process group started as ``name`` (SIGKILL: no cleanup); its exit status."""
        proc = self.named[name]
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return proc.wait(timeout=30)

    def superlink(self, *, database: Path | None = None, name: str = "superlink") -> None:
        """``database``: the SuperLink's state on disk (a restarted SuperLink keeps its nodes and runs)."""
        log = self._start(
            name,
            [
                str(BIN / "flower-superlink"),
                *self._security(),
                "--host",
                self.host,
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
                *(["--database", str(database)] if database is not None else []),
            ],
        )
        wait_for(log, "Uvicorn running", timeout=60)

    def supernode(
        self, name: str, node_config: str | None, *, node_key: str | None = None, expect: str = "SuperNode ID"
    ) -> Path:
        args = [
            str(BIN / "flower-supernode"),
            *self._security(node_key=node_key),
            "--superlink",
            f"{self.dial}:{self.port}",
            "--port",
            str(free_port()),
        ]
        if node_config is not None:
            args += ["--node-config", node_config]
        log = self._start(name, args)
        wait_for(log, expect, timeout=60)
        return log

    def site_worker(self, site: str, socket_path: Path, *, name: str = "", env: dict[str, str] | None = None) -> Path:
        """A hospital's long-lived worker (``fedclip site-worker``); its node config names the socket."""
        log = self._start(
            name or f"{site}-worker",
            [str(BIN / "fedclip"), "site-worker", "--site", site, "--socket", str(socket_path)],
            env=env,
        )
        wait_for(log, "listening on", timeout=120)
        return log

    def _job(self, run_config: Path, app: Path, wait: float) -> list[str]:
        return [str(BIN / "fedclip"), "job", str(app), "loopback", "--run-config", str(run_config), "--wait", str(wait)]

    def run(
        self, run_config: Path, *, timeout: float = 600, app: Path = REPO, wait: float = 120
    ) -> subprocess.CompletedProcess:
        """The operator's command (``fedclip job``: ``flwr run --stream``, exit status by how the run
        ended); ``app``: the Flower app's folder (default this project's)."""
        return subprocess.run(
            self._job(run_config, app, wait),
            cwd=REPO,
            env=_env(self.home),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start_job(self, run_config: Path, *, app: Path = REPO, wait: float = 120) -> subprocess.Popen:
        """``run`` without waiting for it (a test kills a party meanwhile); its output on stdout."""
        return subprocess.Popen(
            self._job(run_config, app, wait),
            cwd=REPO,
            env=_env(self.home),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def stop(self) -> None:
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=30)


def make_certificates(
    folder: Path,
    nodes: tuple[str, ...],
    *,
    names: tuple[str, ...] = ("localhost", "127.0.0.1"),
    other_servers: dict[str, tuple[str, ...]] | None = None,
) -> Path:
    """A certificate authority, a SuperLink certificate ``server.pem`` for ``names`` (its subject
    alternative names: the host names and addresses the parties dial), and an ECDSA key pair per
    SuperNode (OpenSSH format, as ``flwr supernode register`` expects). ``other_servers``: more
    SuperLink certificates from the same authority, ``{stem: names}`` as ``stem.pem`` and ``stem.key``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    def certificate(subject: str, key, issuer: str, signer, *extensions):
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity[0])
            .not_valid_after(validity[1])
        )
        for ext, critical in extensions:
            b = b.add_extension(ext, critical=critical)
        return b.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (folder / "ca.crt").write_bytes(
        certificate(
            "fedclip test CA",
            ca_key,
            "fedclip test CA",
            ca_key,
            (x509.BasicConstraints(ca=True, path_length=None), True),
        )
    )

    def alt(name: str) -> x509.GeneralName:
        try:
            return x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            return x509.DNSName(name)

    for stem, server_names in {"server": names, **(other_servers or {})}.items():
        server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        alternatives = x509.SubjectAlternativeName([alt(n) for n in server_names])
        (folder / f"{stem}.pem").write_bytes(
            certificate(server_names[0], server_key, "fedclip test CA", ca_key, (alternatives, False))
        )
        (folder / f"{stem}.key").write_bytes(
            server_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    for node in nodes:
        key = ec.generate_private_key(ec.SECP384R1())
        (folder / f"{node}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            )
        )
        (folder / f"{node}.pub").write_bytes(
            key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        )
    return folder
