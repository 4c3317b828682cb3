"""A simulation that outgrows one machine runs on a Ray cluster started the way docs/federation.md
says: ``ray start --head --node-ip-address HEAD`` on one machine, ``ray start --address HEAD:6379
--node-ip-address OWN`` on another, and ``flower-simulation ... --backend-config '{"init_args":
{"address": "HEAD:6379"}}'`` on the head.

The two "machines" are two network namespaces the test creates (a veth pair between them, one
address each, nothing else): each Ray node sees only its own address and reaches the other over the
link, as it would across hosts, so the cluster cannot lean on a shared 127.0.0.1. Each node has one
CPU and a site needs one, so the two sites' ClientApp actors must land on different nodes; the test
checks that they did, from Ray's own actor table. Both nodes share this machine's file system, as a
real cluster must share the data paths (docs/federation.md, "Simulations on a Ray cluster").

Needs root (namespaces), as CI runs; every process and namespace is removed by the test.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("ip") is None,
    reason="network namespaces need Linux, root and iproute2 (CI has all three)",
)


@dataclass
class Machine:
    """One network namespace standing in for one host."""

    netns: str
    address: str
    temp_dir: str  # Ray's --temp-dir: each host keeps its own sessions and sockets
    processes: list[subprocess.Popen] = field(default_factory=list)

    def run(self, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.netns, *cmd], cwd=REPO, **kwargs)

    def start(self, cmd: list[str], log: Path) -> None:
        with log.open("w") as out:
            self.processes.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", self.netns, *cmd],
                    cwd=REPO,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def stop(self) -> None:
        """``ray start --block`` stops its node's processes on SIGTERM; whatever is left in the
        namespace after that is killed, then the namespace (and its end of the link) is deleted."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while (pids := _pids(self.netns)) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)
        subprocess.run(["ip", "netns", "del", self.netns], check=False)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _pids(netns: str) -> list[int]:
    done = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, check=False)
    return [int(p) for p in done.stdout.split()]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def two_machines() -> Iterator[tuple[Machine, Machine]]:
    tag = f"{os.getpid() % 100000}"
    subnet = f"10.213.{os.getpid() % 250}"
    # Short temp dirs: Ray's socket paths live under them and must fit a Unix socket's 107 bytes.
    head = Machine(f"fcrh{tag}", f"{subnet}.1", tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    worker = Machine(f"fcrw{tag}", f"{subnet}.2", tempfile.mkdtemp(prefix="rw", dir="/tmp"))
    machines = (head, worker)
    try:
        for m in machines:
            _ip("netns", "add", m.netns)
        _ip("link", "add", f"{head.netns}v", "type", "veth", "peer", "name", f"{worker.netns}v")
        for m in machines:
            _ip("link", "set", f"{m.netns}v", "netns", m.netns)
            _ip("-n", m.netns, "addr", "add", f"{m.address}/24", "dev", f"{m.netns}v")
            _ip("-n", m.netns, "link", "set", f"{m.netns}v", "up")
            _ip("-n", m.netns, "link", "set", "lo", "up")
        yield machines
    finally:
        for m in machines:
            m.stop()


# What the test adds to the documented commands: one CPU a node (so the two sites' actors must use
# both), --block (so the test owns the node's processes and can stop them), a temp dir per host.
EXTRA = ["--block", "--disable-usage-stats"]


def _documented_ray_start() -> tuple[list[str], list[str]]:
    """The two ``ray start`` lines of docs/federation.md's Ray-cluster block, as argument lists."""
    text = (REPO / "docs" / "federation.md").read_text()
    block = text[text.index("**Simulations on a Ray cluster.**") :].split("```bash", 1)[1].split("```", 1)[0]
    lines = [shlex.split(line.strip()) for line in block.splitlines() if line.strip().startswith("ray start")]
    assert len(lines) == 2 and "--head" in lines[0] and "--address" in lines[1], block
    return lines[0], lines[1]


def _fill(cmd: list[str], *, head: str, own: str) -> list[str]:
    """The documented command with this test's addresses, Ray of this environment and one CPU."""
    cmd = [str(BIN / "ray")] + [a.replace("HEAD", head).replace("OWN", own) for a in cmd[1:]]
    return [*cmd[: cmd.index("--num-cpus") + 1], "1", *cmd[cmd.index("--num-cpus") + 2 :]]


ACTORS = """
import json, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR")
nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
actors = [a for a in state.actors().values() if a["ActorClassName"] == "ClientAppActor"]
print(json.dumps({"nodes": nodes, "actor_nodes": [a["Address"]["NodeID"] for a in actors]}))
"""

NODES = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
print(sum(1 for n in ray.nodes() if n["Alive"]))
"""


def test_the_simulation_runs_on_a_ray_cluster_of_two_hosts_started_with_ray_start(two_machines, tmp_path):
    head, worker = two_machines
    address = f"{head.address}:6379"
    head_cmd, worker_cmd = _documented_ray_start()
    head_cmd = _fill(head_cmd, head=head.address, own=head.address) + ["--temp-dir", head.temp_dir, *EXTRA]
    worker_cmd = _fill(worker_cmd, head=head.address, own=worker.address) + ["--temp-dir", worker.temp_dir, *EXTRA]
    head.start(head_cmd, tmp_path / "head.log")
    worker.start(worker_cmd, tmp_path / "worker.log")
    deadline = time.monotonic() + 180
    alive = 0
    while alive < 2:
        assert time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-3000:] + (
            tmp_path / "worker.log"
        ).read_text()[-3000:]
        time.sleep(3)
        done = head.run([sys.executable, "-c", NODES, address], capture_output=True, text=True, timeout=120)
        alive = int(done.stdout.strip() or 0) if done.returncode == 0 else 0

    out = tmp_path / "run"
    cmd = [
        str(BIN / "flower-simulation"),
        "--app",
        "simulations.hospital_clip",
        "--run-config",
        "simulations/hospital_clip/small.toml num-rounds=1",
        "--output",
        str(out),
        "--backend-config",
        json.dumps({"init_args": {"address": address}}),
    ]
    done = head.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((out / "status.json").read_text())["status"] == "finished"
    rounds = pd.read_csv(out / "rounds.csv")
    assert sorted(rounds.loc[rounds["status"] == "trained", "site"]) == ["hospital_0", "hospital_1"]

    seen = head.run([sys.executable, "-c", ACTORS, address], capture_output=True, text=True, timeout=120, check=True)
    table = json.loads(seen.stdout.strip().splitlines()[-1])
    nodes, actor_nodes = table["nodes"], table["actor_nodes"]
    assert sorted(nodes.values()) == sorted([head.address, worker.address]), nodes  # one node per host
    assert len(actor_nodes) == 2 and set(actor_nodes) == set(nodes), table  # one site's actor on each host
