"""Input-level privatization in the federation, through ``flower-simulation`` as a user runs it:
each site releases its images once (charged once, in its own ledger and the server's), then trains
on them with no further spending; mask-replace claims no epsilon and is charged as non-private."""

import math
import subprocess
import sys

import pandas as pd
import pytest

from fedclip.privacy.accountant import epsilon
from fedclip.privacy.events import Relation
from fedclip.privacy.ledger_store import LedgerStore
from fedclip.privatize.plan import InputPlan
from simulations.hospital_clip.config import SimulationConfig

SMALL = "simulations/hospital_clip/small.toml"
MODES = {
    "cadp": "dp-mode='cadp' target-epsilon=8.0 budget=8.0 inn-epochs=2",
    "maskdp": "dp-mode='maskdp' target-epsilon=8.0 budget=8.0 identity-region=0.5",
    "mask-replace": "dp-mode='mask-replace' target-epsilon=0.0 budget=inf identity-region=0.5",
}


def _releases(events):
    return [e for e in events if e.relation == Relation.REPLACE_ONE and e.sample_rate == 1.0]


def test_the_plan_charges_the_release_once_and_training_as_post_processing():
    cfg = SimulationConfig(dp_mode="cadp", target_epsilon=4.0, images_per_patient=6)
    plan = cfg.round_plan(
        0.0,
        InputPlan.calibrated(
            "cadp",
            target_epsilon=4.0,
            delta=1e-5,
            images_per_unit=6,
            radius=0.0,
            image_size=32,
            inn_checkpoint="/inn.pt",
        ),
    )
    assert [e.steps for e in plan.events()] == [0]  # training on privatized images spends nothing
    release = plan.input_release()
    assert release.steps == 6 and epsilon([release], delta=1e-5) <= 4.0
    again = type(plan).from_record(plan.to_record(), hash_key="k")
    assert again.input == plan.input and again.mode == "cadp"
    replace = cfg.round_plan(
        0.0,
        InputPlan.calibrated(
            "mask-replace", target_epsilon=0.0, delta=1e-5, images_per_unit=6, radius=0.0, image_size=32
        ),
    )
    assert replace.input_release() is None and math.isinf(epsilon(replace.events(), delta=1e-5))
    with pytest.raises(ValueError, match="input-images-per-unit"):
        SimulationConfig(dp_mode="cadp", manifest=SMALL, target_epsilon=4.0)  # a manifest must declare it
    with pytest.raises(ValueError, match="target-epsilon"):
        SimulationConfig(dp_mode="maskdp", target_epsilon=0.0)
    with pytest.raises(ValueError, match="no site could ever train"):  # the release costs its epsilon at once
        SimulationConfig(dp_mode="cadp", target_epsilon=8.0, budget=4.0)


@pytest.mark.parametrize("mode", list(MODES))
def test_a_federation_on_privatized_images_spends_once(tmp_path, mode):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "simulations.cli",
        "--app",
        "simulations.hospital_clip",
        "--output",
        str(out),
        "--run-config",
        f"{SMALL} cache-dir='{tmp_path / 'cache'}' {MODES[mode]}",
        "--backend-config",
        '{"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}',
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rounds = pd.read_csv(out / "rounds.csv")
    assert (rounds["status"] == "trained").all() and sorted(set(rounds["round"])) == [1, 2]
    summary = (out / "summary.md").read_text()
    for site, g in rounds.groupby("site"):
        eps = g.sort_values("round")["epsilon"].tolist()
        own = LedgerStore(out / "sites" / site / "ledger.sqlite", delta=1e-5)
        server = LedgerStore(out / "state" / "ledger.sqlite", delta=1e-5)
        private = pd.read_csv(out / "sites" / site / f"privatized-{mode}" / "rows.csv")
        assert len(private) > 0 and private["filepath"].str.startswith("images/private_").all()
        assert (out / "sites" / site / f"privatized-{mode}" / "privatization.png").is_file()  # the site's picture
        if mode == "mask-replace":
            assert all(math.isinf(e) for e in eps) and "No epsilon" in summary
            assert not _releases(own.events(site))
            continue
        assert 0 < eps[0] == eps[1] <= 8.0  # one release, nothing more in round 2
        first, second = g.sort_values("round").itertuples()
        assert (first.relation, first.sample_rate, first.steps) == ("replace_one", 1.0, 4)  # the release, 4 images
        assert second.steps == 0  # training on the privatized images
        assert len(_releases(own.events(site))) == 1 and len(_releases(server.events(site))) == 1
        assert own.ledger(site).epsilon() == pytest.approx(server.ledger(site).epsilon())
    if mode != "mask-replace":
        assert "local, replace-one" in summary and "Not covered" in summary
    assert (out / "utility.csv").is_file() and (out / "attack.csv").is_file()
