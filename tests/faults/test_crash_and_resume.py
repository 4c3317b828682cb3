"""Kill the server at every phase of a round that writes state, resume, and check the ledgers.

Each run is a real process (the real ServerApp and ClientApp, the transport in-process:
``tests/faults/local_grid.py``) killed with ``os._exit`` at the phase. After the resume:

- the server's ledger charges every event any site actually ran (each site's own ledger is the
  truth about what it ran), so its epsilon is never below the true spending;
- every table has exactly one row per round (and site): no round is counted twice;
- no site's charged epsilon exceeds its budget.
"""

import collections
import shutil

import pandas as pd
import pytest

from fedclip.privacy.ledger_store import LedgerStore
from strategies.faults import CRASH_EXIT_CODE, PHASES
from tests.faults.local_grid import run_local

SITES = ("hospital_0", "hospital_1")
TINY = (
    "num-sites=2 patients-per-site=6 public-patients=30 heldout-patients=8 images-per-patient=4 "
    "query-images-per-patient=3 idia-queries=3 idia-distractors=20 warm-start-epochs=3 local-steps=2 "
    "microbatch-size=3 target-epsilon=0.0 noise-multiplier=2.0 num-rounds=3"
)
BUDGET = 9.0  # three planned rounds cost about 7.4: a crashed attempt's extra charge can push the last round out


def _run(out, cache, extra: str, crash: str | None = None):
    return run_local(out, cache, f"{TINY} {extra}", env={"FEDCLIP_CRASH_AT": crash} if crash else {}, timeout=300)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _multiset(events) -> collections.Counter:
    return collections.Counter(e.to_json() for e in events)


@pytest.mark.parametrize("phase", PHASES)
def test_a_crash_at_any_phase_never_loses_spending_or_counts_a_round_twice(tmp_path, cache, phase):
    out = tmp_path / "run"
    crashed = _run(out, cache, f"budget={BUDGET}", crash=f"{phase}:2")
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr[-3000:]
    resumed = _run(out, cache, f"budget={BUDGET} resume=true")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]

    server = LedgerStore(out / "state" / "ledger.sqlite", delta=1e-5)
    for site in SITES:
        own = LedgerStore(out / "sites" / site / "ledger.sqlite", delta=1e-5)
        truth, charged = _multiset(own.events(site)), _multiset(server.events(site))
        assert not truth - charged, f"{site}: events the site ran but the server never charged: {truth - charged}"
        assert server.ledger(site).epsilon() >= own.ledger(site).epsilon()
        assert server.ledger(site).epsilon() <= BUDGET
    rounds = pd.read_csv(out / "rounds.csv")
    assert not rounds.duplicated(["round", "site"]).any()
    assert sorted(rounds["round"].unique()) == [1, 2, 3]
    assert pd.read_csv(out / "utility.csv")["round"].tolist() == [0, 1, 2, 3]
    for name, rows in pd.read_csv(out / "attack.csv").groupby("attack"):  # every attack once per round
        # the sites' replies are attacked once, in the last round
        assert rows["round"].tolist() == ([3] if name.endswith("-replies") else [0, 1, 2, 3]), name
    if phase != "saved":  # the crashed attempt at round 2 was charged, and round 2 ran again
        assert [r for r in server.rounds() if r[1] == 2].count(("hospital_0", 2)) == 2


def test_resume_refuses_a_missing_ledger_or_one_behind_the_model(tmp_path, cache):
    out = tmp_path / "run"
    assert _run(out, cache, "budget=inf", crash="saved:1").returncode == CRASH_EXIT_CODE
    ledger = out / "state" / "ledger.sqlite"
    behind = tmp_path / "behind.sqlite"
    shutil.copy(ledger, behind)  # the ledger as it was after round 1
    assert _run(out, cache, "budget=inf resume=true", crash="saved:2").returncode == CRASH_EXIT_CODE

    shutil.copy(behind, ledger)  # the model is at round 2, the ledger covers round 1 only
    refused = _run(out, cache, "budget=inf resume=true")
    assert refused.returncode != 0
    assert f"resume: {ledger} records 1 rounds but the saved model is at round 2" in refused.stderr

    ledger.unlink()
    refused = _run(out, cache, "budget=inf resume=true")
    assert refused.returncode != 0
    assert f"resume: {ledger} is missing but the saved model is at round 2" in refused.stderr


def test_a_resumed_run_reads_the_attackers_reference_scores_back(tmp_path, cache):
    """The shadow federation is trained once: a run killed after round 1 resumes with its scores."""
    out = tmp_path / "run"
    crashed = _run(out, cache, "budget=inf lira-references=1", crash="saved:1")
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr[-3000:]
    assert "lira: training 1 reference model" in crashed.stdout
    assert (out / "state" / "lira_references.npz").is_file()
    resumed = _run(out, cache, "budget=inf lira-references=1 resume=true")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "lira: the 1 reference models' scores read back" in resumed.stdout
    assert "lira: training" not in resumed.stdout
    attack = pd.read_csv(out / "attack.csv")
    assert sorted(attack.loc[attack["attack"] == "lira-patient", "round"]) == [0, 1, 2, 3]
