"""``fedclip site-setup`` and ``site-start``: a hospital's users, file modes and the SuperNode's checks.

As root (CI): the test makes a hospital's folder with ``consortium-init``, sets it up with users it
creates, and checks the modes, that ``site-start supernode`` refuses while another user can read the
manifest or no worker answers, and starts once both hold. The hostile bundle on loopback is
``tests/deployment/test_hostile_bundle.py``.
"""

from __future__ import annotations

import os
import pwd
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from simulations.consortium_init import consortium_init
from simulations.loopback import BIN, REPO
from simulations.site_setup import SiteSetup, site_setup


def _fedclip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fedclip"), *args], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture
def hospital(open_root: Path, small_manifest_path: Path, warm_checkpoint: Path) -> Path:
    """hospital_0's folder as consortium-init writes it (readable by everyone until site-setup)."""
    folders = consortium_init(small_manifest_path, open_root / "consortium", base=warm_checkpoint)
    return folders["hospital_0"]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(node_config_file="/nonexistent/node-config.txt"), "--node-config-file"),
        (dict(node_user="fc-same", app_user="fc-same"), "two distinct users"),
        (dict(node_user="root"), "neither root"),
        (dict(superlink="no-port"), "--superlink: expected host:port"),
        (dict(root_certificates="/etc/hostname"), "--root-certificates and --node-key go together"),
        (dict(runtime_port=0), "--runtime-port"),
        (dict(node_user="fc-nobody-here"), "--node-user: no OS user named 'fc-nobody-here'"),
    ],
)
def test_bad_setup_input_is_refused_naming_the_flag_before_anything_changes(hospital, open_root, change, message):
    args = (
        dict(
            node_config_file=hospital / "node-config.txt",
            run_dir=open_root / "run",
            superlink="127.0.0.1:9092",
            node_user="nobody",
            app_user="daemon",
        )
        | change
    )
    before = stat.S_IMODE((hospital / "manifest.csv").stat().st_mode)
    with pytest.raises(ValueError, match=message):
        site_setup(**args)
    assert not (open_root / "run").exists()
    assert stat.S_IMODE((hospital / "manifest.csv").stat().st_mode) == before


def test_the_supernode_starts_only_once_no_other_user_reads_the_data_and_the_worker_answers(
    hospital: Path, open_root: Path, site_users: tuple[str, str], reachable_installation: None
):
    node_user, app_user = site_users
    run = open_root / "run"
    assert stat.S_IMODE((hospital / "manifest.csv").stat().st_mode) & 0o044  # readable before the setup
    done = _fedclip(
        "site-setup",
        "--node-config-file",
        str(hospital / "node-config.txt"),
        "--run-dir",
        str(run),
        "--superlink",
        "127.0.0.1:9092",
        "--node-user",
        node_user,
        "--app-user",
        app_user,
        "--create-users",
    )
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert f"fedclip site-start supernode {run}   # runs as {node_user}" in done.stdout
    setup = SiteSetup.load(run)
    for path, user, mode in (
        (hospital / "manifest.csv", "root", 0o600),
        (hospital, "root", 0o700),
        (hospital / "state", "root", 0o700),
        (run, "root", 0o711),
        (setup.home(node_user), node_user, 0o700),
        (setup.home(app_user), app_user, 0o700),
        (setup.secret(app_user), app_user, 0o600),
    ):
        info = path.stat()
        assert (pwd.getpwuid(info.st_uid).pw_name, stat.S_IMODE(info.st_mode)) == (user, mode), path

    # another user can read the manifest: refused, naming the file and both users
    os.chmod(hospital, 0o755)
    os.chmod(hospital / "manifest.csv", 0o644)
    check = _fedclip("site-start", "supernode", str(run), "--check")
    assert check.returncode != 0
    for user in site_users:
        assert f"OS user {user!r} can read the manifest {hospital / 'manifest.csv'}" in check.stderr, check.stderr
    os.chmod(hospital, 0o700)
    os.chmod(hospital / "manifest.csv", 0o600)

    check = _fedclip("site-start", "supernode", str(run), "--check")
    assert check.returncode != 0 and "no worker answers" in check.stderr, check.stderr
    worker = subprocess.Popen(
        [str(BIN / "fedclip"), "site-start", "worker", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while not setup.socket.exists() and time.time() < deadline and worker.poll() is None:
            time.sleep(0.2)
        check = _fedclip("site-start", "supernode", str(run), "--check")
        assert check.returncode == 0, check.stderr
        assert "checks passed" in check.stdout
        sock = setup.socket.stat()
        assert stat.S_IMODE(sock.st_mode) == 0o660 and sock.st_gid == pwd.getpwnam(app_user).pw_gid
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=30)
