"""The consortium's data, made once for every loopback test of the session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deployment.consortium import make_consortium


@pytest.fixture(scope="session")
def hospital_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_consortium(tmp_path_factory.mktemp("deployed_data"), tmp_path_factory.mktemp("parties"))
