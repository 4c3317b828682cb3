"""Shared fixtures: one small synthetic data set and one warm start per test session; for a hospital
set up with ``fedclip site-setup``, OS users, a folder other users may pass through, and this Python
installation runnable by them (CI runs as root; all undone after)."""

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

from fedclip.data.manifest import Manifest, load_manifest
from fedclip.data.synthetic import SyntheticConfig, generate
from fedclip.training.warmstart import WarmStartConfig, warm_start
from simulations.loopback import REPO

# identity_strength 1.0 (the data default until 2026-12-02): at the default 1.5 a patient's look weighs
# more than the finding, and a warm start on 60 public patients learns the finding only to 0.31
# (chance 0.20; measured), too little for the tests that need a model that knows the findings.
# The default's own warm start, on 500 public patients, reaches 0.515 (docs/results.md).
SMALL = SyntheticConfig(
    seed=7,
    num_sites=3,
    patients_per_site=8,
    public_patients=60,
    heldout_patients=20,
    images_per_patient=6,
    query_images_per_patient=4,
    identity_strength=1.0,
)
SMALL_WARM = WarmStartConfig(epochs=15, batch_size=64, lr=1e-3, seed=0)


@pytest.fixture(scope="session")
def small_manifest_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("small_data"), SMALL)


@pytest.fixture(scope="session")
def small_manifest(small_manifest_path: Path) -> Manifest:
    return load_manifest(small_manifest_path)


@pytest.fixture(scope="session")
def warm_checkpoint(small_manifest_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return warm_start(small_manifest_path, cache_dir=tmp_path_factory.mktemp("cache"), config=SMALL_WARM)


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
