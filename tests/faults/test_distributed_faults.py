"""dp-mode distributed under faults: a site lost at each SecAgg+ stage, a sum below the threshold,
and the server killed at each phase of a round, then resumed.

Real ServerApp and ClientApp (Flower's SecAgg+ workflow and mod), the in-process transport of the
fault tests. The epsilon per adversary is checked against an independent computation: the Skellam
bound and both subsampling directions written out here from the papers, composed over the shares
each sum really held, converted by dp-accounting.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon
from scipy.special import comb, logsumexp

from fedclip.privacy.ledger_store import LedgerStore
from strategies.faults import CRASH_EXIT_CODE, PHASES
from tests.faults.local_grid import run_local

TINY = (
    "num-sites=3 patients-per-site=6 public-patients=30 heldout-patients=8 images-per-patient=4 "
    "query-images-per-patient=3 idia-queries=3 idia-distractors=20 warm-start-epochs=3 lira=false "
    "dp-mode=distributed local-steps=1 num-rounds=3 target-epsilon=6 budget=inf sample-rate=0.5 "
    "secure-agg-threshold=2 secure-agg-colluders=1 failure-quorum=0.5"
)
SITES = ("hospital_0", "hospital_1", "hospital_2")


def _run(out, cache, extra: str = "", env: dict | None = None):
    return run_local(out, cache, f"{TINY} {extra}", env=env)


ORDERS = list(range(2, 65)) + list(range(72, 257, 8))


def independent_epsilon(variances: list[float], *, l1: float, l2: float, q: float, delta: float) -> float:
    """Agarwal et al. 2021 (Skellam RDP), the binomial expansion (adding) and the Taylor bound
    (removing) for Poisson sampling, RDP added over the sums, dp-accounting's conversion."""

    def skellam(a: int, mu: float) -> float:
        return a * l2**2 / (2 * mu) + min(((2 * a - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))

    rdp = []
    for a in ORDERS:
        total = 0.0
        for mu in variances:
            if q == 1.0:  # no sampling: the Skellam bound itself
                total += skellam(a, mu)
                continue
            logs = [a * math.log1p(-q), math.log(a * q) + (a - 1) * math.log1p(-q)] + [
                math.log(comb(a, k, exact=True)) + (a - k) * math.log1p(-q) + k * math.log(q) + (k - 1) * skellam(k, mu)
                for k in range(2, a + 1)
            ]
            adding = logsumexp(logs) / (a - 1)
            removing = math.log1p(((1 - q) ** -(a - 1) - 1 - (a - 1) * q) * math.expm1(skellam(2, mu))) / (a - 1)
            total += min(max(adding, removing), skellam(a, mu))
        rdp.append(total)
    return compute_epsilon(ORDERS, rdp, delta)[0]


def check_adversaries(out, shares_per_sum: list[int]) -> dict:
    """distributed.json against the independent computation, from the plan in config.json."""
    config = json.loads((out / "config.json").read_text())
    report = json.loads((out / "distributed.json").read_text())
    share, dim, scale = config["secure-agg-share-variance"], config["secure-agg-dim"], config["secure-agg-scale"]
    site = report["level"] == "site"  # a whole site's clipped update, every site each round
    clip = config["client-clip-norm"] if site else config["max-grad-norm"]
    l2 = scale * clip + math.sqrt(dim)
    l1 = min(math.sqrt(dim) * scale * clip + dim, l2**2)
    q, delta = 1.0 if site else config["sample-rate"], config["delta"]
    assert report["sums"] == len(shares_per_sum)
    expected = {
        "server": independent_epsilon([n * share for n in shares_per_sum], l1=l1, l2=l2, q=q, delta=delta),
        # one colluder subtracts one share from every sum; a site alone has its own share only
        "colluding": independent_epsilon([(n - 1) * share for n in shares_per_sum], l1=l1, l2=l2, q=q, delta=delta),
        "own-share": independent_epsilon([share] * len(shares_per_sum), l1=l1, l2=l2, q=q, delta=delta),
    }
    for adversary, eps in expected.items():
        assert report["epsilon"][adversary] == pytest.approx(eps, rel=1e-6), adversary
    return report


def server_steps(out) -> int:
    """The AdamW steps the server's optimizer has taken, from the checkpoint a resume continues from."""
    saved = torch.load(out / "state" / "global.pt", map_location="cpu", weights_only=True)
    return int(saved["server_state"]["server_step"]["optimizer"]["state"][0]["step"])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def whole(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("whole") / "run"
    done = _run(out, cache)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return out


def test_an_uninterrupted_run_states_three_epsilons_each_checked_independently(whole):
    report = check_adversaries(whole, [3, 3, 3])
    eps = report["epsilon"]
    assert eps["server"] < eps["colluding"] < eps["own-share"]
    # every site's ledger charges the plan: threshold (2) shares, never below what the server alone faced
    for site in SITES:
        charged = LedgerStore(whole / "state" / "ledger.sqlite", delta=1e-5).ledger(site).epsilon()
        own = LedgerStore(whole / "sites" / site / "ledger.sqlite", delta=1e-5).ledger(site).epsilon()
        assert charged == pytest.approx(own) and eps["server"] <= charged <= 6.0
    summary = (whole / "summary.md").read_text()
    assert "Epsilon per adversary" in summary and "nobody: a site's own share only" in summary
    assert "idia-replies: not run" in summary and "idia-replies" not in set(pd.read_csv(whole / "attack.csv")["attack"])
    assert (pd.read_csv(whole / "rounds.csv")["status"] == "trained").all()
    assert server_steps(whole) == 3


@pytest.mark.parametrize(
    "stage, in_sum",
    [("setup", False), ("share_keys", False), ("collect_masked_vectors", False), ("unmask", True)],
)
def test_a_site_lost_at_each_secagg_stage(tmp_path, cache, stage, in_sum):
    """Lost after sending its masked vector (unmask): recovered, its share in the sum. Lost before:
    out of the sum, the round decodes the other two, the privacy figures use two shares, and the
    lost site's charge stays."""
    out = tmp_path / "run"
    done = _run(out, cache, env={"FEDCLIP_TEST_DROP": f"3:{stage}:2"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    check_adversaries(out, [3, 3 if in_sum else 2, 3])
    rows = pd.read_csv(out / "rounds.csv").set_index(["round", "site"])
    assert rows.loc[(2, "hospital_2"), "status"] == ("trained" if in_sum else "failed")
    assert LedgerStore(out / "state" / "ledger.sqlite", delta=1e-5).ledger("hospital_2").steps == 3


def test_fewer_sites_than_the_threshold_fail_the_round_loudly_and_keep_the_charges(tmp_path, cache):
    out = tmp_path / "run"
    done = _run(out, cache, env={"FEDCLIP_TEST_DROP": "2,3:share_keys:2"})
    assert done.returncode != 0
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed" and "below the reconstruction threshold 2" in status["reason"]
    server = LedgerStore(out / "state" / "ledger.sqlite", delta=1e-5)
    assert all(server.ledger(site).steps == 2 for site in SITES)  # round 2's charges stay
    assert len(server.secure_sums()) == 1  # only round 1 was decoded


@pytest.mark.parametrize("phase", PHASES)
def test_the_server_killed_at_each_phase_then_resumed_loses_no_sum(tmp_path, cache, phase):
    out = tmp_path / "run"
    crashed = _run(out, cache, env={"FEDCLIP_CRASH_AT": f"{phase}:2"})
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr[-3000:]
    resumed = _run(out, cache, "resume=true")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    # a sum recorded before the crash (from 'replied' on: it existed at the server) counts beside the re-run one
    decoded_twice = phase not in ("charged", "sent", "saved")
    check_adversaries(out, [3, 3, 3, 3] if decoded_twice else [3, 3, 3])
    rounds = pd.read_csv(out / "rounds.csv")
    assert not rounds.duplicated(["round", "site"]).any() and sorted(rounds["round"].unique()) == [1, 2, 3]
    server = LedgerStore(out / "state" / "ledger.sqlite", delta=1e-5)
    for site in SITES:
        own = LedgerStore(out / "sites" / site / "ledger.sqlite", delta=1e-5)
        assert server.ledger(site).epsilon() >= own.ledger(site).epsilon()
    assert np.isfinite(json.loads((out / "distributed.json").read_text())["epsilon"]["server"])
    # the server's AdamW moments came back with the model: one step per round, none lost or repeated
    assert server_steps(out) == 3


def test_a_round_between_evaluations_is_a_point_to_resume_from(tmp_path, cache):
    out = tmp_path / "run"
    crashed = _run(out, cache, "evaluate-every=3", env={"FEDCLIP_CRASH_AT": "saved:2"})
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stdout[-2000:] + crashed.stderr[-3000:]
    assert server_steps(out) == 2 and not (out / "models" / "round_002.pt").exists()  # not evaluated: not kept
    resumed = _run(out, cache, "resume=true evaluate-every=3")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resuming after round 2" in resumed.stdout and server_steps(out) == 3
    check_adversaries(out, [3, 3, 3])


def test_a_sites_policy_names_the_adversary_its_ledger_and_caps_count_against(tmp_path, cache):
    """distributed-adversary = own-share: the site's ledger charges what its own share alone
    protects (distributed.json's own-share figure), while the server's ledger charges the server's
    figure; a cap on that figure is enforced by the site, naming the rule."""
    policy = tmp_path / "policy.toml"
    policy.write_text('[default]\nallowed-dp-modes = "distributed"\ndistributed-adversary = "own-share"\n')
    out = tmp_path / "run"
    done = _run(out, cache, f"site-policy-file={policy}")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = check_adversaries(out, [3, 3, 3])
    for site in SITES:
        own = LedgerStore(out / "sites" / site / "ledger.sqlite", delta=1e-5).ledger(site).epsilon()
        server = LedgerStore(out / "state" / "ledger.sqlite", delta=1e-5).ledger(site).epsilon()
        assert own == pytest.approx(report["epsilon"]["own-share"], rel=1e-6)
        assert server < own
    capped = tmp_path / "capped.toml"
    cap = report["epsilon"]["own-share"] * 0.8  # two rounds fit, the third does not
    capped.write_text(policy.read_text() + f"max-epsilon-total = {cap}\n")
    refused = _run(tmp_path / "refused", cache, f"site-policy-file={capped}")
    assert refused.returncode != 0
    status = json.loads((tmp_path / "refused" / "status.json").read_text())
    assert "max-epsilon-total" in status["reason"] and "site policy refuses the round" in status["reason"]


def test_site_level_noise_in_shares_gives_client_level_dp_without_clean_updates(tmp_path, cache):
    """secure-agg with client-dp-epsilon: local training as usual, each site's clipped update plus its
    share of the client-level noise summed by SecAgg+; the site-level epsilon per adversary, checked
    independently (every site every round: no sampling), within the target for the server alone."""
    out = tmp_path / "run"
    site_level = "dp-mode=nonprivate local-steps=2 target-epsilon=0 client-dp-epsilon=8 secure-agg=true"
    done = _run(out, cache, site_level)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = check_adversaries(out, [3, 3, 3])
    assert report["level"] == "site" and report["epsilon"]["server"] <= 8.0
    utility = pd.read_csv(out / "utility.csv")
    assert len(utility) == 4 and utility["zero_shot_accuracy"].notna().all()
    assert not (out / "site_level.json").exists()  # the server added no noise of its own
    assert "one whole site's update" in (out / "summary.md").read_text()
