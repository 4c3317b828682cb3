"""``fedclip site-setup`` and ``site-start``: a hospital's users, file modes and the SuperNode's checks.

As root (CI): bad input is refused before anything changes. The setup itself, its modes and
``site-start``'s refusals are tested with the hostile bundle on loopback
(``tests/deployment/test_hostile_bundle.py``), which starts the three users' processes anyway.
"""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from simulations.consortium_init import consortium_init
from simulations.loopback import BIN, REPO
from simulations.site_setup import site_setup


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
