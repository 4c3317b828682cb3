"""Fixtures for a hospital set up with ``fedclip site-setup``: OS users, a folder other users may
pass through, and this Python installation runnable by them (CI runs as root; all undone after)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulations.loopback import REPO


@pytest.fixture
def as_root() -> None:
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("a hospital's OS users need root and useradd (CI has both)")


@pytest.fixture
def site_users(as_root) -> Iterator[tuple[str, str]]:
    """Names for the node and app users (``site-setup --create-users`` makes them); removed after."""
    names = (f"fcnode{os.getpid() % 100000}", f"fcapp{os.getpid() % 100000}")
    yield names
    for name in names:
        subprocess.run(["userdel", name], capture_output=True, check=False)


@pytest.fixture
def reachable_installation(as_root) -> Iterator[None]:
    """The node and app users must run this Python (a hospital installs it where they can); here it
    may sit under a folder only root can pass (``/root/.pyenv``): grant others passage (o+x, not
    listing) on such folders for the test, and take it back after."""
    changed: list[tuple[Path, int]] = []
    for target in {Path(sys.executable).resolve(), Path(sys.prefix), Path(sys.base_prefix).resolve(), REPO}:
        for folder in reversed(target.parents):
            mode = stat.S_IMODE(folder.stat().st_mode)
            if not mode & stat.S_IXOTH and (folder, mode) not in changed:
                os.chmod(folder, mode | stat.S_IXOTH)
                changed.append((folder, mode))
    try:
        yield
    finally:
        for folder, mode in reversed(changed):
            os.chmod(folder, mode)


@pytest.fixture
def open_root(as_root) -> Iterator[Path]:
    """A folder every user may pass through (0711, as /srv or /var/lib would be): pytest's own
    temporary folders are 0700, which would hide the data from other users whatever site-setup did."""
    root = Path(tempfile.mkdtemp(prefix="fedclip-site-", dir="/tmp"))
    root.chmod(0o711)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
