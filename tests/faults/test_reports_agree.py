"""The run's reports say what the ledgers say, in every way a site can fail to train: lost after
round 1, refusing by its policy, failing before it read any data. ``summary.md``'s site table,
``rounds.csv``, the site's own ``spending.csv`` and both ledgers (the server's and each site's) are
compared row by row; where the ledgers differ (a refusing site charged nothing, the server keeps
its planned charge), the summary says why.

Real ServerApp and ClientApp over the in-process transport of the fault tests.
"""

import pandas as pd
import pytest

from fedclip.privacy.ledger_store import LedgerStore
from tests.faults.local_grid import run_local

BASE = (
    "num-sites=3 patients-per-site=6 public-patients=30 heldout-patients=8 images-per-patient=4 "
    "query-images-per-patient=3 idia-queries=3 idia-distractors=20 warm-start-epochs=3 lira=false "
    "local-steps=2 microbatch-size=3 target-epsilon=0.0 noise-multiplier=2.0 num-rounds=3 failure-quorum=0.5"
)
SITES = ("hospital_0", "hospital_1", "hospital_2")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _run(out, cache, extra: str = "", env: dict | None = None):
    return run_local(out, cache, f"{BASE} {extra}", env=env)


def _eps(value: float) -> str:
    return f"{value:.3f}"


def check_reports_agree(out) -> pd.DataFrame:
    """Every figure each report gives for each site, against the ledger it comes from."""
    summary = (out / "summary.md").read_text()
    rounds = pd.read_csv(out / "rounds.csv")
    server = LedgerStore(out / "state" / "ledger.sqlite", delta=1e-5, create=False)
    rows = []
    for site in SITES:
        mine = rounds[rounds["site"] == site]
        trained, charged = int((mine["status"] == "trained").sum()), int((mine["status"] != "not-selected").sum())
        server_eps = server.ledger(site).epsilon()
        # rounds.csv's running epsilon is the server's ledger, and it charged every round the site was selected in
        assert mine.sort_values("round")["epsilon"].iloc[-1] == pytest.approx(server_eps)
        assert len({r for s, r in server.rounds() if s == site}) == charged
        own_path = out / "sites" / site / "ledger.sqlite"
        own_eps, own_rounds = 0.0, 0
        if own_path.is_file():
            own = LedgerStore(own_path, delta=1e-5, create=False)
            own_eps = own.ledger(site).epsilon()
            own_rounds = len({r["round"] for r in own.rows()})
            if own_rounds:  # the site's own account (a site that never charged writes none)
                spending = pd.read_csv(out / "sites" / site / "spending.csv")
                assert spending["epsilon_total"].iloc[-1] == pytest.approx(own_eps)
        row = f"| {site} | {trained} | {charged} | {_eps(server_eps)} | {_eps(own_eps)} |"
        assert row in summary, (row, summary[:3000])
        rows.append(
            {
                "site": site,
                "trained": trained,
                "charged": charged,
                "own_rounds": own_rounds,
                "server": server_eps,
                "own": own_eps,
            }
        )
    return pd.DataFrame(rows).set_index("site")


def test_a_site_lost_after_round_1(tmp_path, cache):
    """Its SuperNode is gone from round 2: Flower answers 'node unavailable'; the server keeps both
    rounds' charges (it cannot know), the site's own ledger holds the one round it trained."""
    out = tmp_path / "run"
    done = _run(out, cache, env={"FEDCLIP_TEST_LOSE": "3:2"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    got = check_reports_agree(out)
    assert got.loc["hospital_2"].to_dict() | {"server": 0, "own": 0} == {
        "trained": 1,
        "charged": 3,
        "own_rounds": 1,
        "server": 0,
        "own": 0,
    }
    assert (
        got.loc["hospital_2", "own"] < got.loc["hospital_2", "server"] == pytest.approx(got.loc["hospital_0", "server"])
    )
    statuses = pd.read_csv(out / "rounds.csv").query("site == 'hospital_2'")["status"].tolist()
    assert statuses == ["trained", "lost", "lost"]
    assert (
        "a lost site (no reply) is charged in its own ledger if it received the round"
        in (out / "summary.md").read_text()
    )


def test_a_site_whose_policy_refuses(tmp_path, cache):
    """hospital_2 allows another mode only: it refuses every round before charging; the server keeps
    its planned charges, and the summary says the site's own ledger has nothing."""
    policy = tmp_path / "policy.toml"
    policy.write_text('[hospital_2]\nallowed-dp-modes = "unit"\n')
    out = tmp_path / "run"
    done = _run(out, cache, f"site-policy-file={policy}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    got = check_reports_agree(out)
    assert got.loc["hospital_2", ["trained", "charged", "own_rounds"]].tolist() == [0, 3, 0]
    assert got.loc["hospital_2", "own"] == 0.0 and got.loc["hospital_2", "server"] > 0
    assert "a site refuses before it charges, so its own ledger has nothing" in (out / "summary.md").read_text()


def test_sites_that_fail_before_reading_data(tmp_path, cache):
    """Every site fails in round 2 after charging and before reading data (an exception there): both
    ledgers charge round 2, the run stops, and the reports agree round for round."""
    out = tmp_path / "run"
    done = _run(out, cache, env={"FEDCLIP_RAISE_AT": "site-charged:2"})
    assert done.returncode != 0
    got = check_reports_agree(out)
    for site in SITES:
        assert got.loc[site, ["trained", "charged", "own_rounds"]].tolist() == [1, 2, 2]
        assert got.loc[site, "own"] == pytest.approx(got.loc[site, "server"])
    assert "so a round that failed there is charged in both ledgers" in (out / "summary.md").read_text()
