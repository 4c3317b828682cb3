"""A hospital's long-lived worker: the ClientApp of every message hands its work here.

Flower's deployment runtime starts a fresh ``flwr-clientapp`` process for every message; importing
torch, open_clip and Opacus, building the base model and loading the site's data then costs more
than the training itself. A site may instead start one worker (``fedclip site-worker``) next to its
SuperNode and name its socket in the node config (``site-worker``): each message's ClientApp sends
the message and its context over the socket, the worker runs ``site_rounds.handle`` with the
model and data kept in memory, and sends back the reply's content and the context's state.

Nothing about privacy changes: the worker runs the same code, charges the same ledger before
touching data, and draws noise from the OS in its own process. The socket is a Unix socket created
with mode 0600 under the site's control, and a connection from another user is refused
(``SO_PEERCRED``); the worker serves only the site it was started for. Messages are served one at
a time, in arrival order, like the ledger's rounds. If the worker dies, the message fails the way a
crashed ClientApp does (the ledger records the charge as pending), and the ClientApp names the
socket in its error.

**The worker's own node config** (``--node-config``, the hospital's, read when the worker starts):
then every message is answered with it, whatever node config the ClientApp sends. The ClientApp is
the coordinator's code; a modified one could send another manifest, ledger or policy. With its own
node config the worker takes from a ClientApp only the message (the server's round plan) and the
site's name, which must be its own: paths, policy and ledger are the hospital's. ``--allow-user``
lets one other OS user connect (the user the SuperNode and its ClientApps run as, which then needs
no access to the data: docs/federation.md, "A hospital that does not trust the coordinator's code").
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.common import serde
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

WORKER_KEY = "site-worker"  # node config: the Unix socket of this site's worker
PROTOCOL = 1
_LENGTH = struct.Struct(">Q")
_MAX_PATH = 104  # sun_path is 108 bytes on Linux, 104 on macOS
log = logging.getLogger("fedclip.site_worker")


def _version() -> str:
    try:
        return metadata.version("fedclip")
    except metadata.PackageNotFoundError:
        return "unknown"


def _send(conn: socket.socket, *frames: bytes) -> None:
    for frame in frames:
        conn.sendall(_LENGTH.pack(len(frame)) + frame)


def _receive_exact(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the connection closed mid-message")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _receive(conn: socket.socket, count: int) -> list[bytes]:
    return [_receive_exact(conn, _LENGTH.unpack(_receive_exact(conn, _LENGTH.size))[0]) for _ in range(count)]


def _check_path(socket_path: str, *, show: bool = True) -> str:
    """``show``: name the path (the worker's own command line), or not (an error the server receives)."""
    if len(os.fsencode(socket_path)) >= _MAX_PATH:
        shown = f" {socket_path!r}" if show else ""
        raise ValueError(
            f"site-worker: the socket path{shown} is {len(socket_path)} bytes; a Unix socket path "
            f"must be shorter than {_MAX_PATH}: choose a shorter folder"
        )
    return socket_path


# ---- the ClientApp's side -------------------------------------------------------------------


def forward(socket_path: str, msg: Message, context: Context) -> Message:
    """Hand ``msg`` to the site's worker; its reply to ``msg``. ``context.state`` takes the worker's."""
    header = json.dumps({"protocol": PROTOCOL, "fedclip": _version()}).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(_check_path(socket_path, show=False))
            _send(
                conn,
                header,
                serde.message_to_proto(msg).SerializeToString(),
                serde.context_to_proto(context).SerializeToString(),
            )
            status = json.loads(_receive(conn, 1)[0])
            if not status.get("ok"):
                raise RuntimeError(f"site worker: {status.get('error', 'failed')}")
            content, state = _receive(conn, 2)
    except (ConnectionError, FileNotFoundError, OSError) as exc:  # the path stays at the site: in its own log
        print(f"site worker at {socket_path}: {exc!r}", file=sys.stderr, flush=True)
        raise RuntimeError(
            f"the site worker (node config {WORKER_KEY!r}) did not answer "
            f"({type(exc).__name__}: {str(exc).replace(socket_path, '<socket>')}); is "
            "`fedclip site-worker` running for this site? Its socket path is in this site's log"
        ) from exc
    context.state = serde.recorddict_from_proto(ProtoRecordDict.FromString(state))
    return Message(serde.recorddict_from_proto(ProtoRecordDict.FromString(content)), reply_to=msg)


def ping(socket_path: str, *, timeout: float = 10.0) -> dict[str, Any]:
    """Whether a worker serves ``socket_path``: its answer (``site``, ``own-node-config``); raises
    ``OSError`` if none does."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(_check_path(socket_path))
        _send(conn, json.dumps({"ping": True, "protocol": PROTOCOL}).encode())
        return json.loads(_receive(conn, 1)[0])


# ---- the worker's side ----------------------------------------------------------------------


def _peer_uid(conn: socket.socket) -> int | None:
    if not hasattr(socket, "SO_PEERCRED"):
        return None  # not Linux: the socket's 0600 mode is the only guard
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return uid


def _serve_one(
    conn: socket.socket,
    *,
    site: str,
    handle: Callable[[Message, Context], Message],
    node_config: Mapping[str, Any] | None = None,
    allow_uids: frozenset[int] = frozenset(),
) -> str:
    """Answer one connection; a line for the worker's log."""
    uid = _peer_uid(conn)
    if uid is not None and uid != os.getuid() and uid not in allow_uids:
        _send(conn, json.dumps({"ok": False, "error": f"connection from user {uid} refused"}).encode())
        return f"refused a connection from user {uid}"
    request = json.loads(_receive(conn, 1)[0])
    if request.get("ping"):  # the hospital's own check before it starts its SuperNode (site-start)
        _send(conn, json.dumps({"ok": True, "site": site, "own-node-config": node_config is not None}).encode())
        return "answered a ping"
    msg_bytes, context_bytes = _receive(conn, 2)
    if request.get("protocol") != PROTOCOL or request.get("fedclip") != _version():
        error = (
            f"version mismatch: the ClientApp runs fedclip {request.get('fedclip')} (protocol "
            f"{request.get('protocol')}), this worker {_version()} (protocol {PROTOCOL}); restart the worker "
            "from the same installation as the SuperNode"
        )
        _send(conn, json.dumps({"ok": False, "error": error}).encode())
        return error
    msg = serde.message_from_proto(ProtoMessage.FromString(msg_bytes))
    context = serde.context_from_proto(ProtoContext.FromString(context_bytes))
    kind = msg.metadata.message_type
    claimed = context.node_config.get("site")
    if claimed != site:
        error = f"this worker serves site {site!r}; the node config says site {claimed!r}"
        _send(conn, json.dumps({"ok": False, "error": error}).encode())
        return error
    if node_config is not None:  # the hospital's own: the ClientApp's paths and policy are not used
        context = Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config=dict(node_config),
            state=context.state,
            run_config=context.run_config,
        )
    started = time.perf_counter()
    try:
        reply = handle(msg, context)
    except Exception as exc:  # the round failed: the ClientApp reports it; the worker serves on
        log.error("%s failed:\n%s", kind, traceback.format_exc())
        _send(conn, json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}).encode())
        return f"{kind}: failed ({type(exc).__name__}: {exc})"
    if reply.has_error():
        _send(conn, json.dumps({"ok": False, "error": reply.error.reason}).encode())
        return f"{kind}: error reply ({reply.error.reason})"
    _send(
        conn,
        json.dumps({"ok": True}).encode(),
        serde.recorddict_to_proto(reply.content).SerializeToString(),
        serde.recorddict_to_proto(context.state).SerializeToString(),
    )
    return f"{kind}: answered (run {msg.metadata.run_id}) in {time.perf_counter() - started:.2f} s"


def os_user(name: str, *, flag: str):
    """The OS user ``name`` (``pwd.struct_passwd``), or a ``ValueError`` naming ``flag``."""
    import pwd

    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise ValueError(f"{flag}: no OS user named {name!r} on this machine") from None


def own_node_config(node_config: Mapping[str, Any], *, site: str) -> dict[str, Any]:
    """The hospital's node config as the worker will use it, checked as the ClientApp checks one
    (known keys, the deployed site's required keys, its policy) before the first message."""
    from simulations.hospital_clip.site import DEPLOYED_KEYS, check_node_keys, deployed_policy

    config = dict(node_config)
    if config.get("site", site) != site:
        raise ValueError(f"--node-config: site {config['site']!r}, but this worker serves --site {site!r}")
    config["site"] = site
    check_node_keys(config)
    missing = [k for k in DEPLOYED_KEYS if k not in config]
    if missing:
        raise ValueError(f"--node-config: a hospital's worker needs {list(DEPLOYED_KEYS)}; missing {missing}")
    if WORKER_KEY in config:
        raise ValueError(f"--node-config: {WORKER_KEY!r} belongs in the SuperNode's node config, not the worker's")
    deployed_policy(Context(run_id=0, node_id=0, node_config=config, state=RecordDict(), run_config={}))
    return config


def listen(socket_path: str, *, group: int | None = None) -> socket.socket:
    """A listening socket at ``socket_path``, mode 0600 (0660 with ``group``: that group may connect,
    and ``SO_PEERCRED`` still admits only the allowed users); a stale socket file is replaced, a
    live one refused."""
    path = Path(_check_path(socket_path))
    if path.exists():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # left by a worker that was killed
            else:
                raise ValueError(f"--socket: another worker is serving {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        server.bind(str(path))
    finally:
        os.umask(old)
    if group is not None:
        os.chown(path, -1, group)
        os.chmod(path, 0o660)
    server.listen(8)
    return server


def serve(
    socket_path: str,
    *,
    site: str,
    max_messages: int | None = None,
    on_line: Callable[[str], None] = print,
    handle: Callable[[Message, Context], Message] | None = None,
    node_config: Mapping[str, Any] | None = None,
    allow_users: tuple[str, ...] = (),
) -> int:
    """Serve ``site``'s messages at ``socket_path`` until stopped (or ``max_messages`` connections);
    ``handle``: what answers a message (default ``site_rounds.handle``, imported once, here);
    ``node_config``: the hospital's own, used for every message (checked now); ``allow_users``: OS
    users besides this one that may connect (the SuperNode's)."""
    if handle is None:
        from simulations.hospital_clip.site_rounds import handle
    if node_config is not None:
        node_config = own_node_config(node_config, site=site)
    allowed = {name: (u.pw_uid, u.pw_gid) for name in allow_users for u in [os_user(name, flag="--allow-user")]}
    groups = {gid for _, gid in allowed.values()}
    if len(groups) > 1:
        raise ValueError(f"--allow-user: the users {sorted(allowed)} have different primary groups; allow one user")
    server = listen(socket_path, group=next(iter(groups)) if groups else None)
    served = 0
    on_line(f"site worker for {site!r} listening on {socket_path}")
    try:
        while max_messages is None or served < max_messages:
            conn, _ = server.accept()
            with conn:
                try:
                    on_line(
                        _serve_one(
                            conn,
                            site=site,
                            handle=handle,
                            node_config=node_config,
                            allow_uids=frozenset(uid for uid, _ in allowed.values()),
                        )
                    )
                except Exception as exc:  # a malformed or broken connection ends itself, not the worker
                    on_line(f"connection dropped: {type(exc).__name__}: {exc}")
            served += 1
    finally:
        server.close()
        Path(socket_path).unlink(missing_ok=True)
    return served
