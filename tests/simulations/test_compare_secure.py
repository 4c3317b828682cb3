"""The secure-aggregation settings of ``fedclip compare``, run as the user runs them (opt-in by name):
federated DP-SGD over SecAgg+ (fed-distributed) and client-level DP in shares (fed-distributed-client)."""

import math
import subprocess
import sys

import pandas as pd
import pytest

from tests.simulations.test_compare import SMALL as GENERAL

# the general comparison test's small base, with few steps: every step of fed-distributed is a secure sum
SMALL = (
    GENERAL.replace("settings = {settings}", 'settings = ["fed-distributed", "fed-distributed-client"]')
    .replace("local-steps = 30", "local-steps = 3")
    .replace("num-rounds = 4", "num-rounds = 2")
    .replace("microbatch-size = 2\n", "")
)


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    base = tmp_path_factory.mktemp("compare_secure")
    config = base / "compare.toml"
    config.write_text(SMALL.format(out=base / "out"))
    done = subprocess.run(
        [sys.executable, "-m", "simulations.commands", "compare", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return base / "out"


def test_each_secure_setting_states_its_epsilon_per_adversary_within_the_target(comparison):
    runs = pd.read_csv(comparison / "runs.csv")
    assert sorted(set(runs["setting"])) == ["fed-distributed", "fed-distributed-client"] and len(runs) == 4
    assert runs["replies_tpr"].isna().all()  # the server sees only the secure sum: no reply to attack
    for name, g in runs.groupby("setting"):
        g = g.sort_values("target_epsilon")
        assert (g["epsilon_server"] <= g["target_epsilon"] * (1 + 1e-9)).all(), name
        assert (g["epsilon_server"] < g["epsilon_own_share"]).all(), name
        assert g["epsilon_server"].iloc[0] < g["epsilon_server"].iloc[-1], name
        noise = "noise_multiplier" if name == "fed-distributed" else "site_noise_multiplier"
        assert g[noise].iloc[0] > g[noise].iloc[-1] > 0, name
    distributed = runs[runs["setting"] == "fed-distributed"]
    assert (distributed["rounds"] == 6).all()  # 2 rounds x 3 local steps, as one-step rounds
    client = runs[runs["setting"] == "fed-distributed-client"]
    assert (client["epsilon_site"] == client["epsilon_server"]).all() and math.isinf(client["epsilon_local"].iloc[0])
    assert (
        "epsilon per adversary: server / server + colluders / a site's own share"
        in (comparison / "table.md").read_text()
    )
