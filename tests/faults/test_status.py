"""``status.json`` says how a run ended, however it ended: a polling script must never wait forever."""

import json
import subprocess
import sys

import pytest

from tests.faults.local_grid import run_local
from tests.faults.test_crash_and_resume import TINY


def test_a_crash_while_discovering_the_sites_marks_the_run_failed(tmp_path):
    out = tmp_path / "run"
    # a third SuperNode for two sites
    done = run_local(out, tmp_path / "cache", TINY, env={"FEDCLIP_TEST_EXTRA_NODES": "1"}, timeout=300)
    assert done.returncode != 0
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed", status
    assert status["reason"].startswith("RuntimeError: node 3 failed to say which site it is"), status
    state = subprocess.run(
        [sys.executable, "-m", "simulations.commands", "status", str(out)], capture_output=True, text=True, timeout=120
    )
    assert state.returncode == 1  # what a script branches on


@pytest.mark.parametrize("phase", ["aggregated:2", "report"])
def test_an_exception_in_aggregation_or_in_the_report_marks_the_run_failed(tmp_path, phase):
    """A bug's exception, not a kill: in the second round's aggregation, or in the closing report
    after every round trained. Either way status.json says failed with the exception."""
    out = tmp_path / "run"
    done = run_local(out, tmp_path / "cache", TINY, env={"FEDCLIP_RAISE_AT": phase}, timeout=300)
    assert done.returncode != 0
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed", status
    assert status["reason"].startswith("InjectedFault: fault injection: an exception at phase"), status
    assert f"'{phase.split(':')[0]}'" in status["reason"]
