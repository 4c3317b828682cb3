"""fedclip job's reading of Flower: the run id from flwr run's log, the final status from flwr ls.

The command itself against a real SuperLink is in tests/deployment/test_loopback.py (a finished
run exits 0, a failed one 1 with the reason); here a stand-in ``flwr`` script checks the plumbing.
"""

import json
import stat
import sys

import pytest

from simulations.job import NOT_FINISHED, NOT_STARTED, JobEnd, run_job, run_status


def _listing(status: str, details: str = "", run_id: int = 7) -> str:
    runs = [{"run-id": str(run_id), "status": status, "status-details": details}]
    return "🔍 Displaying information for run ID 7...\n" + json.dumps({"success": True, "runs": runs})


@pytest.mark.parametrize(
    "status, code",
    [("finished:completed", 0), ("finished:failed", 1), ("finished:stopped", 1), ("running", NOT_FINISHED)],
)
def test_the_exit_code_follows_the_runs_final_status(status, code):
    got, details = run_status(_listing(status, "ServerApp failed with exception: hospital_1 refused"), 7)
    end = JobEnd(7, got, details)
    assert end.exit_code == code
    if code == 1:
        assert "hospital_1 refused" in end.message()


def test_unreadable_listings_and_a_missing_run_are_not_success():
    assert run_status("no json here", 7)[0] == ""
    assert run_status(_listing("finished:completed", run_id=8), 7) == ("", "flwr ls does not list run 7")
    assert run_status(json.dumps({"success": False, "error-message": "no connection"}), 7) == ("", "no connection")
    assert JobEnd(7, "", "flwr ls does not list run 7").exit_code == NOT_FINISHED
    assert JobEnd(None, "", "flwr run exited 1").exit_code == NOT_STARTED


@pytest.mark.parametrize("final, code", [("finished:completed", 0), ("finished:failed", 1)])
def test_run_job_streams_the_log_and_asks_the_superlink_how_the_run_ended(tmp_path, final, code):
    """A stand-in flwr: ``run`` prints a log (run 7 started) and exits 0 either way, as Flower's does;
    ``ls`` answers 'running' once, then the final status."""
    calls = tmp_path / "calls"
    fake = tmp_path / "flwr"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, sys, pathlib\n"
        f"calls = pathlib.Path({str(calls)!r})\n"
        "n = len(calls.read_text().splitlines()) if calls.exists() else 0\n"
        "calls.write_text((calls.read_text() if calls.exists() else '') + ' '.join(sys.argv[1:]) + '\\n')\n"
        "if sys.argv[1] == 'run':\n"
        "    print('Successfully started run 7'); print('round 1/2 | zero-shot 0.5'); sys.exit(0)\n"
        f"status = 'running' if n < 2 else {final!r}\n"
        "print(json.dumps({'success': True, 'runs': [{'run-id': '7', 'status': status, "
        "'status-details': 'ServerApp failed with exception: hospital_0 refused the plan'}]}))\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    lines: list[str] = []
    end = run_job(".", "consortium", run_config="run.toml", flwr=str(fake), wait=30, echo=lines.append)
    assert end.run_id == 7 and end.status == final and end.exit_code == code
    assert "round 1/2 | zero-shot 0.5\n" in lines  # the operator saw the log as it came
    made = calls.read_text().splitlines()
    assert made[0] == "run . consortium --stream --run-config run.toml"
    assert made[1:] == ["ls consortium --run-id 7 --format json"] * 2


def test_no_run_id_in_the_log_is_not_started(tmp_path):
    fake = tmp_path / "flwr"
    fake.write_text(f"#!{sys.executable}\nimport sys\nprint('Connection refused'); sys.exit(1)\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    end = run_job(".", "consortium", flwr=str(fake), wait=1, echo=lambda _: None)
    assert end.exit_code == NOT_STARTED and "Connection refused" in end.message()
