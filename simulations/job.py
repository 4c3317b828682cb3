"""A consortium job a script can trust: ``flwr run`` with its log streamed, then the run's own status.

``flwr run --stream`` exits 0 whatever happened to the run (Flower 1.41: a policy refusal, a
killed SuperNode, a ServerApp crash all end in 0). ``fedclip job`` starts the run the same way,
passes its log through, then asks the SuperLink (``flwr ls --run-id N --format json``) how the run
ended and exits by that:

    0   finished:completed
    1   finished:failed or finished:stopped (the ServerApp's exception, which names the site and
        the reason, is printed: the ServerApp raises on every failed run, see ``server_app``)
    2   no run was started (``flwr run`` failed, or printed no run id)
    3   the run had not finished when the wait ran out

The SuperLink connection is Flower's own (``FLWR_HOME``'s config); nothing here talks to it but
the ``flwr`` command.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

STARTED = re.compile(r"Successfully started run (\d+)")
EXIT_CODES = {"completed": 0, "failed": 1, "stopped": 1}
NOT_STARTED, NOT_FINISHED = 2, 3


@dataclass(frozen=True)
class JobEnd:
    run_id: int | None
    status: str  # Flower's status text, e.g. finished:failed; "" when no run was started
    details: str  # Flower's status details (the ServerApp's exception), or why no run was started

    @property
    def exit_code(self) -> int:
        if self.run_id is None:
            return NOT_STARTED
        if not self.status.startswith("finished"):
            return NOT_FINISHED
        return EXIT_CODES.get(self.status.rsplit(":", 1)[-1], 1)

    def message(self) -> str:
        if self.run_id is None:
            return f"no run was started: {self.details}"
        if self.exit_code == 0:
            return f"run {self.run_id} finished"
        if self.exit_code == NOT_FINISHED:
            return f"run {self.run_id} had not finished ({self.status or 'status unknown'}): {self.details}"
        return f"run {self.run_id} {self.status.rsplit(':', 1)[-1]}: {self.details or '(Flower gave no details)'}"


def run_status(ls_output: str, run_id: int) -> tuple[str, str]:
    """(status, details) of ``run_id`` from ``flwr ls --format json``'s output (its last JSON object)."""
    start = ls_output.find("{")
    if start < 0:
        return "", f"flwr ls printed no JSON: {ls_output.strip()[-500:]}"
    try:
        listing = json.loads(ls_output[start:])
    except json.JSONDecodeError as exc:
        return "", f"flwr ls printed unreadable JSON ({exc}): {ls_output.strip()[-500:]}"
    if not listing.get("success", False):
        return "", str(listing.get("error-message", listing))
    for run in listing.get("runs", []):
        if str(run.get("run-id")) == str(run_id):
            return str(run.get("status", "")), str(run.get("status-details", ""))
    return "", f"flwr ls does not list run {run_id}"


def run_job(
    app: str,
    superlink: str,
    *,
    run_config: str = "",
    flwr: str = "flwr",
    wait: float = 120.0,
    echo: Callable[[str], None] = lambda line: print(line, end="", flush=True),
    cwd: Path | None = None,
) -> JobEnd:
    """Start ``app`` on ``superlink`` with ``flwr run --stream``, echo its log, and return how the
    run ended as the SuperLink records it (polled for up to ``wait`` seconds after the log ends)."""
    cmd = [flwr, "run", app, superlink, "--stream"] + (["--run-config", run_config] if run_config else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd)
    run_id, tail = None, []
    for line in proc.stdout:  # the run's log as it comes: the operator sees progress
        echo(line)
        tail = (tail + [line])[-20:]
        if run_id is None and (found := STARTED.search(line)):
            run_id = int(found.group(1))
    code = proc.wait()
    if run_id is None:
        return JobEnd(None, "", f"flwr run exited {code}: {''.join(tail).strip()[-1500:]}")
    deadline = time.monotonic() + wait
    while True:
        ls = subprocess.run(
            [flwr, "ls", superlink, "--run-id", str(run_id), "--format", "json"],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=60,
        )
        status, details = run_status(ls.stdout, run_id)
        if status.startswith("finished") or time.monotonic() > deadline:
            return JobEnd(run_id, status, details)
        time.sleep(1.0)


def main(app: str, superlink: str, *, run_config: str, wait: float) -> int:
    flwr = Path(sys.executable).with_name("flwr")
    end = run_job(app, superlink, run_config=run_config, flwr=str(flwr if flwr.exists() else "flwr"), wait=wait)
    print(f"fedclip job: {end.message()}", file=sys.stderr if end.exit_code else sys.stdout, flush=True)
    return end.exit_code
