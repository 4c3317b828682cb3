"""The site worker: a message handed over a Unix socket is answered as the ClientApp would answer it.

Real sockets and a real worker loop (in a thread); the deployed round trip with real processes is
in ``tests/deployment/test_loopback.py``.
"""

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedclip.models.arrays import model_to_arrays
from fedclip.models.factory import ModelConfig, create_model
from fedclip.privacy.events import events_from_wire
from simulations.hospital_clip import client_app, site_worker
from simulations.hospital_clip.config import SimulationConfig
from simulations.hospital_clip.server_app import train_config_record
from strategies.privacy_budget import PRIVACY_RECORD

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


@pytest.fixture
def sock(tmp_path_factory) -> Path:
    return Path(tmp_path_factory.mktemp("w", numbered=True)) / "s.sock"  # short: sun_path has 108 bytes


def _start(sock: Path, *, site: str = "hospital_0", messages: int = 1, handle=None) -> tuple[threading.Thread, list]:
    lines: list[str] = []
    thread = threading.Thread(
        target=site_worker.serve,
        args=(str(sock),),
        daemon=True,
        kwargs=dict(site=site, max_messages=messages, on_line=lines.append, handle=handle),
    )
    thread.start()
    for _ in range(200):
        if any("listening" in line for line in lines):
            return thread, lines
        threading.Event().wait(0.02)
    raise TimeoutError("worker did not start")


def _node(sock: Path, site: str = "hospital_0", **extra) -> Context:
    config = {
        "site": site,
        "manifest": "/m.csv",
        "checkpoint": "/c.pt",
        "state-dir": "/s",
        "site-worker": str(sock),
        **extra,
    }
    return Context(run_id=1, node_id=7, node_config=config, state=RecordDict(), run_config={})


def _query() -> Message:
    return Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=7, message_type=MessageType.QUERY)


def test_a_query_is_answered_by_the_worker_with_the_site_of_its_node_config(sock):
    thread, lines = _start(sock)
    reply = client_app(_query(), _node(sock))
    thread.join(timeout=30)
    assert not reply.has_error(), reply.error.reason
    assert reply.content["site"]["site"] == "hospital_0"
    assert lines[-1].startswith("query: answered (run 1) in ")
    assert not sock.exists()  # the worker removed its socket when it stopped


def test_the_socket_is_private_to_its_user(sock):
    thread, _ = _start(sock)
    mode = stat.S_IMODE(os.stat(sock).st_mode)
    assert mode & 0o077 == 0, oct(mode)
    client_app(_query(), _node(sock))
    thread.join(timeout=30)


def test_a_worker_refuses_another_sites_messages(sock):
    thread, lines = _start(sock, site="hospital_1")
    with pytest.raises(RuntimeError, match="serves site 'hospital_1'; the node config says site 'hospital_0'"):
        client_app(_query(), _node(sock, site="hospital_0"))  # Flower turns this into the error reply
    thread.join(timeout=30)


def test_a_failed_message_is_reported_and_the_worker_serves_on(sock):
    calls = []

    def handle(msg, context):
        calls.append(msg.metadata.message_type)
        if len(calls) == 1:
            raise ValueError("site policy refuses the round at hospital_0: max-epsilon: 9 > 8")
        context.state["seen"] = MetricRecord({"messages": len(calls)})
        return Message(RecordDict({"ok": ConfigRecord({"n": len(calls)})}), reply_to=msg)

    thread, lines = _start(sock, messages=2, handle=handle)
    with pytest.raises(RuntimeError, match="site policy refuses the round at hospital_0"):  # REFUSAL kept
        client_app(_query(), _node(sock))
    context = _node(sock)
    answered = client_app(_query(), context)
    thread.join(timeout=30)
    assert not answered.has_error() and answered.content["ok"]["n"] == 2
    assert context.state["seen"]["messages"] == 2  # the node's context takes the worker's state
    assert lines[1].startswith("query: failed (ValueError")


def test_no_worker_running_names_the_command_and_keeps_the_socket_path_at_the_site(sock, capsys):
    with pytest.raises(RuntimeError, match="is `fedclip site-worker` running for this site") as info:
        client_app(_query(), _node(sock))
    assert "node config 'site-worker'" in str(info.value) and str(sock) not in str(info.value)  # the server's copy
    assert str(sock) in capsys.readouterr().err  # the site's own log


def test_a_stale_socket_is_replaced_and_a_live_one_refused(sock):
    stale = site_worker.listen(str(sock))
    stale.close()  # a killed worker leaves its socket file behind
    assert sock.exists()
    thread, lines = _start(sock, messages=2)  # the probe of the refused second worker is a connection too
    with pytest.raises(ValueError, match="another worker is serving"):
        site_worker.listen(str(sock))
    client_app(_query(), _node(sock))
    thread.join(timeout=30)
    assert lines[1].startswith("connection dropped") and lines[2].startswith("query: answered (run 1)")


def test_a_socket_path_too_long_is_refused_naming_its_length(tmp_path):
    long = tmp_path / ("x" * 120) / "s.sock"
    with pytest.raises(ValueError, match="site-worker: the socket path .* must be shorter than"):
        site_worker.listen(str(long))


def test_a_train_round_through_the_worker_charges_the_sites_ledger(
    sock, small_manifest_path, warm_checkpoint, tmp_path
):
    """The real handler behind the socket: the reply carries the update and the privacy event,
    and the site's own ledger has the round."""
    cfg = SimulationConfig(
        manifest=str(small_manifest_path),
        sites="hospital_0,hospital_1",
        declared_units=6,
        target_epsilon=0.0,
        local_steps=2,
        trainable="last-1",
    )
    config = train_config_record(cfg, noise_multiplier=1.0, manifest="", checkpoint="")
    config["server-round"] = 1
    model = create_model(ModelConfig(pretrained=str(warm_checkpoint), trainable="last-1")).model
    msg = Message(
        RecordDict({"arrays": model_to_arrays(model, trainable_only=True), "config": config}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    state = tmp_path / "state"
    context = _node(
        sock, manifest=str(small_manifest_path), checkpoint=str(warm_checkpoint), **{"state-dir": str(state)}
    )
    context.node_config["declared-units"] = 6
    thread, lines = _start(sock)
    reply = client_app(msg, context)
    thread.join(timeout=120)
    assert not reply.has_error(), reply.error.reason
    assert set(reply.content["arrays"].keys()) == set(model_to_arrays(model, trainable_only=True).keys())
    (event,) = events_from_wire(reply.content[PRIVACY_RECORD]["events"])[:1]
    assert event.noise_multiplier == pytest.approx(1.0)
    assert (state / "ledger.sqlite").is_file() and (state / "spending.csv").is_file()
    assert lines[-1].startswith("train: answered (run 1) in ")


def test_the_clientapp_module_imports_nothing_heavy():
    """A fresh process per message on the deployment runtime: the hand-over must not import torch,
    nor must the secure sum's client half (three of a secure round's four messages need only it)."""
    code = (
        "import sys, simulations.hospital_clip.client_app, simulations.hospital_clip.site_worker; "
        "import strategies.secure_sum; "
        "heavy = sorted(m for m in ('torch', 'open_clip', 'opacus', 'pandas') if m in sys.modules); "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


HOSPITAL = {"manifest": "/hospital/manifest.csv", "checkpoint": "/hospital/base.pt", "state-dir": "/hospital/state"}


def test_the_workers_own_node_config_is_used_whatever_the_clientapp_sends(sock):
    """The ClientApp is the coordinator's code: started with the hospital's node config, the worker
    answers with its paths and policy, not the ones a (modified) ClientApp sends."""
    seen = []

    def handle(msg, context):
        seen.append(dict(context.node_config))
        return Message(RecordDict({"ok": ConfigRecord({})}), reply_to=msg)

    thread = threading.Thread(
        target=site_worker.serve,
        args=(str(sock),),
        daemon=True,
        kwargs=dict(
            site="hospital_0",
            max_messages=1,
            on_line=lambda line: None,
            handle=handle,
            node_config={**HOSPITAL, "max-epsilon-run": 2.0},
        ),
    )
    thread.start()
    for _ in range(200):
        if sock.exists():
            break
        threading.Event().wait(0.02)
    hostile = _node(sock, manifest="/elsewhere/all_patients.csv", **{"max-epsilon-run": 100.0, "state-dir": "/tmp/x"})
    reply = client_app(_query(), hostile)
    thread.join(timeout=30)
    assert not reply.has_error(), reply.error.reason
    assert seen == [{"site": "hospital_0", **HOSPITAL, "max-epsilon-run": 2.0}]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({**HOSPITAL, "max-epsilon": 8.0}, "unknown key.*'max-epsilon'"),
        ({"manifest": "/m.csv"}, "missing \\['checkpoint', 'state-dir'\\]"),
        ({**HOSPITAL, "site": "hospital_9"}, "site 'hospital_9', but this worker serves --site 'hospital_0'"),
        ({**HOSPITAL, "site-worker": "/s.sock"}, "'site-worker' belongs in the SuperNode's node config"),
    ],
)
def test_a_bad_worker_node_config_is_refused_before_it_listens(sock, config, message):
    with pytest.raises(ValueError, match=message):
        site_worker.serve(str(sock), site="hospital_0", node_config=config, handle=lambda m, c: m)
    assert not sock.exists()


ASK = """
import sys
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from simulations.hospital_clip.site_worker import forward
TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
msg = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=7, message_type=MessageType.QUERY)
ctx = Context(run_id=1, node_id=7, node_config={"site": "hospital_0"}, state=RecordDict(), run_config={})
try:
    forward(sys.argv[1], msg, ctx)
    print("answered")
except RuntimeError as exc:
    print("error:", exc)
"""


@pytest.fixture
def node_user():
    """An unprivileged OS user, as a SuperNode runs as (created and removed by the test; needs root)."""
    if os.geteuid() != 0 or not Path("/usr/sbin/useradd").exists():
        pytest.skip("creating an OS user needs root and useradd (CI has both)")
    name = f"fcnode{os.getpid() % 100000}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False)


def test_only_the_allowed_user_reaches_the_worker(node_user):
    """``--allow-user``: the SuperNode's user may connect (mode 0660, its group, ``SO_PEERCRED``);
    without it that user cannot even open the socket."""
    import pwd
    import tempfile

    entry = pwd.getpwnam(node_user)
    folder = Path(tempfile.mkdtemp(prefix="fcw", dir="/tmp"))
    folder.chmod(0o711)  # the node's user may reach the socket, not list the folder
    try:
        for allow, expected in (((node_user,), "answered"), ((), "error:")):
            sock = folder / "w.sock"
            handle = lambda msg, context: Message(RecordDict({"ok": ConfigRecord({})}), reply_to=msg)  # noqa: E731
            thread = threading.Thread(
                target=site_worker.serve,
                args=(str(sock),),
                daemon=True,
                kwargs=dict(
                    site="hospital_0", max_messages=1, on_line=lambda line: None, handle=handle, allow_users=allow
                ),
            )
            thread.start()
            for _ in range(200):
                if sock.exists():
                    break
                threading.Event().wait(0.02)
            ask = subprocess.run(
                ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]
                + [sys.executable, "-c", ASK, str(sock)],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert ask.stdout.strip().startswith(expected), (allow, ask.stdout, ask.stderr[-2000:])
            if not allow:  # the worker never saw a connection: stop it with one of root's own
                assert "PermissionError" in ask.stdout
                client_app(_query(), _node(sock))
            thread.join(timeout=30)
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
