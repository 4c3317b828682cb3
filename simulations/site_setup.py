"""fedclip site-setup and site-start: a hospital runs the coordinator's code without trusting it.

The ClientApp that ``flwr run`` ships is the coordinator's code. Set up this way, it runs as an OS
user that cannot read the hospital's data, and the hospital's own worker does the privacy work:

- the **worker** (``fedclip site-worker``, this installation, the hospital's node config), as the
  *data owner*: alone reads the manifest, images, state folder and ledger; enforces the policy,
  charges the ledger, trains with OS noise, builds the reply;
- the **SuperNode**, as the *node user*: holds the node's key, talks to the SuperLink, cannot read
  the data; its node config names the site and the worker's socket, nothing else;
- the **SuperExec** and every ClientApp process it starts (the coordinator's code), as the *app
  user*: reads neither the data nor the node key; may connect to the worker's socket (mode 0660 for
  its group, and the worker admits its uid and the owner's only, ``SO_PEERCRED``).

``site-setup`` (as root, once) creates the two users if asked, gives the data owner alone the files
the node config names (manifest, images, state folder, base weights), makes the run folder (the
socket's folder, each user's Flower home, the node key's copy, the SuperExec's shared secret) and
writes ``site.json``. ``site-start ROLE RUN_DIR`` (as root, from the hospital's service manager)
starts one process as its user. It starts the SuperNode only after checking, as both users, that
neither can read a data file nor the app user the node key, and that the worker answers: a
SuperNode that could read the data is refused, naming the file (docs/federation.md, "A hospital
that does not trust the coordinator's code").
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from simulations.hospital_clip.site_worker import os_user

BIN = Path(sys.executable).parent
ROLES = ("worker", "supernode", "superexec")
SETUP_FILE = "site.json"


@dataclass(frozen=True)
class SiteSetup:
    """What ``site-setup`` decided, as ``site-start`` reads it back (``RUN_DIR/site.json``)."""

    site: str
    node_config: str  # the hospital's own, verbatim: the worker's --node-config
    owner: str  # the data owner: runs the worker
    node_user: str  # runs the SuperNode
    app_user: str  # runs the SuperExec and the coordinator's ClientApps
    run_dir: str
    superlink: str  # host:port of the SuperLink
    root_certificates: str = ""  # "" = insecure (a test on loopback)
    runtime_port: int = 9094  # the SuperNode's runtime API for the SuperExec, on 127.0.0.1

    @property
    def socket(self) -> Path:
        return Path(self.run_dir) / "worker.sock"

    def home(self, user: str) -> Path:
        """Each unprivileged user's Flower home (``FLWR_HOME``): its own, mode 0700."""
        return Path(self.run_dir) / ("node" if user == self.node_user else "app")

    @property
    def node_key(self) -> Path | None:
        key = self.home(self.node_user) / "node.key"
        return key if self.root_certificates else None

    def secret(self, user: str) -> Path:
        return self.home(user) / "superexec.secret"

    @classmethod
    def load(cls, run_dir: str | Path) -> SiteSetup:
        path = Path(run_dir) / SETUP_FILE
        if not path.is_file():
            raise ValueError(f"site-start: {path} not found; run `fedclip site-setup` first")
        return cls(**json.loads(path.read_text()))


def _own(path: Path, user: pwd.struct_passwd, mode: int) -> None:
    os.chown(path, user.pw_uid, user.pw_gid)
    os.chmod(path, mode)


def data_paths(node_config: dict[str, Any]) -> dict[str, list[Path]]:
    """The hospital's files no other user may read: ``{kind: paths}`` (the manifest, every image it
    names, the state folder and everything in it, the base weights)."""
    from fedclip.data.manifest import load_manifest
    from fedclip.data.schema import MASK_COLUMN

    outside = str(node_config.get("allow-outside-paths", "false")).lower() == "true"
    manifest = load_manifest(node_config["manifest"], verify_images=False, allow_outside_paths=outside)
    images = [Path(p) for p in manifest.frame["filepath"]]
    if MASK_COLUMN in manifest.frame:
        images += [Path(p) for p in manifest.frame[MASK_COLUMN] if p]
    return {
        "manifest": [manifest.source],
        "image": images,
        "state": _state_files(Path(str(node_config["state-dir"]))),
        "checkpoint": [Path(str(node_config["checkpoint"]))],
    }


def _state_files(state: Path) -> list[Path]:
    return [state, *sorted(state.rglob("*"))] if state.exists() else [state]


_PROBE = """
import json, os, sys
try:
    import flwr.supernode, simulations.hospital_clip.client_app
except Exception as exc:
    print(json.dumps({"cannot-run": f"{type(exc).__name__}: {exc}"}))
    sys.exit(0)
readable = []
for p in json.load(sys.stdin):
    try:
        if os.path.isdir(p):
            os.listdir(p)
        else:
            open(p, "rb").close()
    except OSError:
        continue
    readable.append(p)
print(json.dumps({"readable": readable}))
"""


def probe_as(user: pwd.struct_passwd, paths: list[Path]) -> tuple[str | None, list[Path]]:
    """As ``user``: why it cannot run this installation's Flower and fedclip (None: it can), and
    which of ``paths`` it can open (folders: list)."""
    env = {"PATH": f"{BIN}{os.pathsep}/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"}
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE],
            input=json.dumps([str(p) for p in paths]),
            capture_output=True,
            text=True,
            env=env,
            cwd="/",
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[],
            timeout=120,
        )
        answer = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {}
        why = answer.get("cannot-run") or (
            None if answer else (done.stderr.strip() or f"exit {done.returncode}")[-300:]
        )
    except OSError as exc:  # the interpreter itself is out of the user's reach
        why, answer = str(exc), {}
    if why:
        why = (
            f"OS user {user.pw_name!r} cannot run this installation ({sys.executable}): {why}; install fedclip "
            "where every user of the site can run it (for example a virtual environment from a system Python "
            "under /opt)"
        )
    return why, [Path(p) for p in answer.get("readable", [])]


def separation_problems(setup: SiteSetup) -> list[str]:
    """Everything that would let the SuperNode or the coordinator's code reach the data; [] if none."""
    from simulations.cli import parse_run_config

    problems = []
    paths = data_paths(parse_run_config(setup.node_config))
    every = [p for kind in paths.values() for p in kind]
    for name in (setup.node_user, setup.app_user):
        keys = [setup.node_key] if setup.node_key is not None and name == setup.app_user else []
        why, readable = probe_as(os_user(name, flag="site.json"), every + keys)
        if why:
            problems.append(why)
        for path in readable:
            kind = next((k for k, v in paths.items() if path in v), "node key")
            problems.append(f"OS user {name!r} can read the {kind} {path}")
    return problems


def site_setup(
    *,
    node_config_file: str | Path,
    run_dir: str | Path,
    superlink: str,
    node_user: str,
    app_user: str,
    owner: str | None = None,
    root_certificates: str | Path | None = None,
    node_key: str | Path | None = None,
    runtime_port: int = 9094,
    create_users: bool = False,
) -> SiteSetup:
    """Make the users (``create_users``), lock the data to its owner, make the run folder, write
    ``site.json``. Everything is checked before anything is changed."""
    from simulations.cli import parse_run_config
    from simulations.hospital_clip.site_worker import own_node_config

    if os.geteuid() != 0:
        raise ValueError("site-setup: run it as root (it creates users and changes owners and modes)")
    text = Path(node_config_file).read_text().strip() if Path(node_config_file).is_file() else None
    if text is None:
        raise ValueError(f"--node-config-file: {node_config_file} is not a file (the hospital's node-config.txt)")
    node_config = parse_run_config(text)
    if "site" not in node_config:
        raise ValueError(f"--node-config-file: {node_config_file} names no 'site'")
    own_node_config(node_config, site=str(node_config["site"]))
    if len({node_user, app_user, owner or ""}) < 3 or "root" in (node_user, app_user):
        raise ValueError("--node-user and --app-user: two distinct users, neither root nor the data owner")
    if (root_certificates is None) != (node_key is None):
        raise ValueError("--root-certificates and --node-key go together (TLS with SuperNode authentication)")
    for flag, path in (("--root-certificates", root_certificates), ("--node-key", node_key)):
        if path is not None and not Path(path).is_file():
            raise ValueError(f"{flag}: {path} is not a file")
    if not 0 < runtime_port < 65536:
        raise ValueError(f"--runtime-port: expected a port, got {runtime_port}")
    host, _, port = superlink.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--superlink: expected host:port, got {superlink!r}")
    paths = data_paths(node_config)
    owner_entry = os_user(owner, flag="--owner") if owner else pwd.getpwuid(paths["manifest"][0].stat().st_uid)
    if owner_entry.pw_name in (node_user, app_user):
        raise ValueError(f"--owner: the data owner {owner_entry.pw_name!r} must not be the node or app user")
    for name, flag in ((node_user, "--node-user"), (app_user, "--app-user")):
        try:
            pwd.getpwnam(name)
        except KeyError:
            if not create_users:
                raise ValueError(f"{flag}: no OS user named {name!r}; create it or pass --create-users") from None
    run = Path(run_dir).resolve()
    setup = SiteSetup(
        site=str(node_config["site"]),
        node_config=text,
        owner=owner_entry.pw_name,
        node_user=node_user,
        app_user=app_user,
        run_dir=str(run),
        superlink=superlink,
        root_certificates=str(Path(root_certificates).resolve()) if root_certificates else "",
        runtime_port=runtime_port,
    )

    state = Path(str(node_config["state-dir"]))  # checked: now change things
    state.mkdir(parents=True, exist_ok=True)
    for path in [p for kind, files in paths.items() if kind != "state" for p in files] + _state_files(state):
        if path.exists():
            _own(path, owner_entry, 0o700 if path.is_dir() else 0o600)
    _own(paths["manifest"][0].parent, owner_entry, 0o700)
    run.mkdir(parents=True, exist_ok=True)
    _own(run, owner_entry, 0o711)  # the socket's folder: others may pass, not list
    secret = secrets.token_hex(32).encode()
    for name in (node_user, app_user):  # each its own Flower home and copy of the SuperExec's secret
        try:
            pwd.getpwnam(name)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                check=True,
                capture_output=True,
            )
        user = pwd.getpwnam(name)
        setup.home(name).mkdir(exist_ok=True)
        _own(setup.home(name), user, 0o700)
        setup.secret(name).write_bytes(secret)
        _own(setup.secret(name), user, 0o600)
    if setup.node_key is not None:
        shutil.copyfile(node_key, setup.node_key)
        _own(setup.node_key, pwd.getpwnam(node_user), 0o600)
    (run / SETUP_FILE).write_text(json.dumps(asdict(setup), indent=2) + "\n")
    os.chmod(run / SETUP_FILE, 0o600)
    return setup


def start_command(setup: SiteSetup, role: str) -> tuple[pwd.struct_passwd, list[str], dict[str, str]]:
    """(user, argv, environment) of ``role``'s process."""
    if role not in ROLES:
        raise ValueError(f"site-start: role {role!r}; expected one of {ROLES}")
    runtime = f"127.0.0.1:{setup.runtime_port}"
    base_env = {"PATH": f"{BIN}{os.pathsep}/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
    if role == "worker":
        user = os_user(setup.owner, flag="site.json owner")
        argv = [
            str(BIN / "fedclip"),
            "site-worker",
            "--site",
            setup.site,
            "--socket",
            str(setup.socket),
            "--allow-user",
            setup.app_user,
            "--node-config",
            setup.node_config,
        ]
        return user, argv, {**base_env, "HOME": user.pw_dir}
    if role == "supernode":
        user = os_user(setup.node_user, flag="site.json node_user")
        security = (
            ["--root-certificates", setup.root_certificates, "--auth-supernode-private-key", str(setup.node_key)]
            if setup.root_certificates
            else ["--insecure"]
        )
        argv = [
            str(BIN / "flower-supernode"),
            *security,
            "--superlink",
            setup.superlink,
            "--isolation",
            "process",
            "--host",
            "127.0.0.1",
            "--port",
            str(setup.runtime_port),
            "--superexec-auth-secret-file",
            str(setup.secret(setup.node_user)),
            "--node-config",
            f"site={_quote(setup.site)} site-worker={_quote(str(setup.socket))}",
        ]
    else:
        user = os_user(setup.app_user, flag="site.json app_user")
        argv = [
            str(BIN / "flower-superexec"),
            "--insecure",  # the runtime API listens on 127.0.0.1 only; the shared secret admits the SuperExec
            "--runtime-api-address",
            runtime,
            "--superexec-auth-secret-file",
            str(setup.secret(setup.app_user)),
        ]
    home = str(setup.home(user.pw_name))
    return user, argv, {**base_env, "HOME": home, "FLWR_HOME": home}


def _quote(value: str) -> str:
    if "'" in value:  # a node config value is TOML in single quotes
        raise ValueError(f"site.json: {value!r} holds a single quote, which a SuperNode's node config cannot carry")
    return f"'{value}'"


def preflight(setup: SiteSetup, role: str) -> None:
    """Refuse to start the SuperNode unless the separation holds and the worker answers."""
    if role != "supernode":
        return
    from simulations.hospital_clip.site_worker import ping

    problems = separation_problems(setup)
    if problems:
        raise ValueError(
            "site-start: the SuperNode is not started: the node and app users must run this installation "
            "and read none of the hospital's data:\n  "
            + "\n  ".join(problems[:20])
            + "\nfix this (fedclip site-setup sets the data's owners and modes) and start again"
        )
    try:
        answer = ping(str(setup.socket))
    except OSError as exc:
        raise ValueError(
            f"site-start: no worker answers at {setup.socket} ({exc}); start it first: "
            f"fedclip site-start worker {setup.run_dir}"
        ) from None
    if answer.get("ok") and answer.get("site") != setup.site:
        raise ValueError(f"site-start: the worker at {setup.socket} serves {answer.get('site')!r}, not {setup.site!r}")


def site_start(run_dir: str | Path, role: str, *, check_only: bool = False) -> None:
    """Become ``role``'s process (``os.execve``), as its user, after the checks; as root."""
    setup = SiteSetup.load(run_dir)
    user, argv, env = start_command(setup, role)
    if os.geteuid() != 0 and os.geteuid() != user.pw_uid:
        raise ValueError(f"site-start {role}: run it as root or as {user.pw_name!r}")
    preflight(setup, role)
    if check_only:
        return
    print(f"site-start {role} as {user.pw_name}: {shlex.join(argv[:6])} ...", flush=True)
    if os.geteuid() == 0 and user.pw_uid != 0:
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)
    os.chdir(env["HOME"] if Path(env["HOME"]).is_dir() else "/")
    os.execve(argv[0], argv, env)
