"""A simulation that outgrows one machine runs on a Ray cluster: here two Ray nodes on this machine,
started the way Ray's own tests start a multi-node cluster (``ray.cluster_utils.Cluster``: a head
and a worker, each with its own raylet and object store), and ``flower-simulation`` connecting to
it with ``--backend-config '{"init_args": {"address": ...}}'``. Each node has one CPU and a site
needs one, so the two sites' ClientApp actors must land on different nodes; the test checks that
they did, from Ray's own actor table. On one machine every node sees the same data paths; on a
real cluster they must be shared (docs/federation.md, "Simulations on a Ray cluster").

Not on 127.0.0.1: with ``node_ip_address="127.0.0.1"`` for both nodes (and ``_node_ip_address`` for
the driver) the cluster came up but the simulation's actors never started within 5 minutes, so
the nodes use the machine's own address, as Ray's defaults do; no traffic leaves the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ray = pytest.importorskip("ray")  # a dependency of flwr[simulation]: present wherever the simulation runs
from ray.cluster_utils import Cluster  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def test_the_simulation_runs_on_a_two_node_ray_cluster_on_this_machine(tmp_path):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        out = tmp_path / "run"
        cmd = [
            str(Path(sys.executable).parent / "flower-simulation"),
            "--app",
            "simulations.hospital_clip",
            "--run-config",
            "simulations/hospital_clip/small.toml num-rounds=1",
            "--output",
            str(out),
            "--backend-config",
            json.dumps({"init_args": {"address": cluster.address}}),
        ]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert json.loads((out / "status.json").read_text())["status"] == "finished"
        rounds = pd.read_csv(out / "rounds.csv")
        assert sorted(rounds.loc[rounds["status"] == "trained", "site"]) == ["hospital_0", "hospital_1"]

        ray.init(address=cluster.address)
        from ray._private import state

        nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        actors = [a for a in state.actors().values() if a["ActorClassName"] == "ClientAppActor"]
        used = {a["Address"]["NodeID"] for a in actors}
        assert len(nodes) == 2 and len(set(nodes.values())) == 1, nodes  # two nodes, one machine
        assert len(actors) == 2 and used == set(nodes), (actors, nodes)  # one site's actor on each node
    finally:
        ray.shutdown()
        cluster.shutdown()
