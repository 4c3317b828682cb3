"""Client-level DP at the server across a crash: the site-level epsilon counts every released aggregate.

The noise of ``client-dp-epsilon`` is added by the server to each round's average, so its epsilon
is composed over the aggregates the server computed. A resumed process rebuilds Flower's wrapper
(and its accountant) at zero: the count must come from the server's write-ahead ledger instead.
Independent computation: dp-accounting's PLD of the same number of unsampled Gaussians, built here.
"""

import json

import pytest
from dp_accounting.pld import privacy_loss_distribution as pld_lib

from fedclip.privacy.ledger_store import LedgerStore
from strategies.faults import CRASH_EXIT_CODE
from tests.faults.test_crash_and_resume import _run

CLIENT = "budget=inf client-dp-epsilon=8.0 client-clip-norm=1.0"


def _independent_epsilon(sigma: float, releases: int, delta: float = 1e-5) -> float:
    one = pld_lib.from_gaussian_mechanism(
        standard_deviation=sigma, sensitivity=1.0, pessimistic_estimate=True, value_discretization_interval=1e-3
    )
    return float(one.self_compose(releases).get_epsilon_for_delta(delta))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("whole") / "run"
    done = _run(out, cache, CLIENT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads((out / "site_level.json").read_text())


def test_uninterrupted_run_counts_every_round(uninterrupted):
    assert uninterrupted["rounds"] == 3
    assert uninterrupted["epsilon"] == pytest.approx(
        _independent_epsilon(uninterrupted["noise_multiplier"], 3), rel=1e-3
    )
    assert uninterrupted["epsilon"] <= 8.0


@pytest.mark.parametrize("phase, releases", [("saved", 3), ("aggregated", 4)])
def test_a_resumed_run_never_reports_a_smaller_site_level_epsilon(tmp_path, cache, uninterrupted, phase, releases):
    """After ``saved`` the resumed run trains round 3 only, yet its epsilon covers rounds 1-3; after
    ``aggregated`` the crashed attempt's noised average existed, so round 2 is counted twice."""
    out = tmp_path / "run"
    crashed = _run(out, cache, CLIENT, crash=f"{phase}:2")
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr[-3000:]
    resumed = _run(out, cache, f"{CLIENT} resume=true")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    site_level = json.loads((out / "site_level.json").read_text())
    assert site_level["rounds"] == releases
    assert LedgerStore(out / "state" / "ledger.sqlite", delta=1e-5).aggregates() == releases
    assert site_level["noise_multiplier"] == uninterrupted["noise_multiplier"]
    assert site_level["epsilon"] == pytest.approx(
        _independent_epsilon(site_level["noise_multiplier"], releases), rel=1e-3
    )
    assert site_level["epsilon"] >= uninterrupted["epsilon"] - 1e-9
    if releases == 3:
        assert site_level["epsilon"] == pytest.approx(uninterrupted["epsilon"])
    assert f"**epsilon {site_level['epsilon']:.3f}**" in (out / "summary.md").read_text()
