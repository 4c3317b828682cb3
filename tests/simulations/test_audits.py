"""The auditor, end to end through ``flower-simulation``: what it certifies on a private run, a
non-private run, and a run whose mechanism lies (a tenth of the noise the ledger records).

The self-test (issues 12 and 31): a broken mechanism must be caught, a certified lower bound above
the printed epsilon; an honest one never is. Pooled data (one site), SGD, 512 gradient canaries,
sample rate 0.5 and two rounds of 40 steps at a printed epsilon of 8: the noise halved is caught by
the Gaussian-pair audit of the replies (measured: 12.9 certified against 8.0; Steinke et al.'s bound
3.3). At the default sample rate of 0.1 a canary's scores spread with how often it was drawn, which
the Gaussian pair cannot use (6.2 certified: docs/privacy.md, "The Gaussian-pair audit"). The statistics of that audit
(its false-alarm rate over repeated draws) are tested in tests/attacks/test_gaussian_pair.py.
"""

import os
import subprocess
import sys

import pandas as pd
import pytest

from fedclip.attacks.one_run import audit_scores, joint_confidence
from fedclip.privacy.sabotage import VARIABLE

SMALL = "simulations/hospital_clip/small.toml"
SELF_TEST = (
    "pool-sites=true gradient-canaries=512 num-rounds=2 local-steps=40 target-epsilon=8.0 budget=8.0 optimizer='sgd' "
    "sample-rate=0.5"
)
NONPRIVATE = (
    "dp-mode='nonprivate' privacy-unit='record' target-epsilon=0.0 trainable='all' lr=0.0005 budget=inf "
    "canaries=64 gradient-canaries=128 num-rounds=3 local-steps=20"
)


def _simulate(out, cache, extra: str, *, sabotage: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != VARIABLE}
    if sabotage:
        env[VARIABLE] = sabotage
    cmd = [
        sys.executable,
        "-m",
        "simulations.cli",
        "--app",
        "simulations.hospital_clip",
        "--output",
        str(out),
        "--run-config",
        f"{SMALL} cache-dir='{cache}' {extra}",
        "--backend-config",
        '{"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}',
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("audit_cache")


def _audited(out) -> pd.DataFrame:
    attack = pd.read_csv(out / "attack.csv")
    return attack[attack["audited_epsilon"].notna()]


def test_the_auditor_catches_a_mechanism_with_half_the_noise(tmp_path, cache):
    done = _simulate(tmp_path / "sabotaged", cache, SELF_TEST, sabotage="2")
    assert "SABOTAGE" in done.stdout + done.stderr
    audited = _audited(tmp_path / "sabotaged")
    final = audited[audited["round"] == audited["round"].max()].set_index("attack").loc["gradient-canary-replies"]
    assert final["max_site_epsilon"] == pytest.approx(8.0, rel=1e-2)  # what the ledger printed
    assert final["gaussian_epsilon"] > final["max_site_epsilon"], final.to_dict()
    assert final["audited_epsilon"] < final["max_site_epsilon"]  # Steinke et al.'s bound alone would miss it
    summary = (tmp_path / "sabotaged" / "summary.md").read_text()
    assert "WARNING: round 2: the gradient-canary-replies audit certifies epsilon" in summary
    assert "ABOVE THE ACCOUNTANT'S" in done.stdout


def test_an_honest_mechanism_is_never_audited_above_its_epsilon(tmp_path, cache):
    _simulate(tmp_path / "honest", cache, SELF_TEST + " canaries=32")
    audited = _audited(tmp_path / "honest")
    assert set(audited["attack"]) == {"canary", "gradient-canary", "gradient-canary-replies"}
    assert (audited["audited_epsilon"] <= audited["max_site_epsilon"]).all(), audited.to_string()
    white_box = audited[audited["attack"].str.startswith("gradient-canary")]
    assert (white_box["gaussian_epsilon"] <= white_box["max_site_epsilon"]).all(), white_box.to_string()
    assert white_box["gaussian_epsilon"].max() > 0  # it does see the canaries, within the bound
    assert "WARNING" not in (tmp_path / "honest" / "summary.md").read_text()
    for name in ("attack.png", "roc.png", "attack_scores.csv"):
        assert (tmp_path / "honest" / name).is_file(), name


def test_a_nonprivate_run_is_audited_clearly_above_zero(tmp_path, cache):
    _simulate(tmp_path / "nonprivate", cache, NONPRIVATE)
    audited = _audited(tmp_path / "nonprivate")
    final = audited[audited["round"] == audited["round"].max()].set_index("attack")
    assert final.loc["gradient-canary", "audited_epsilon"] > 1.0, final.to_string()
    assert final.loc["canary", "audited_epsilon"] > 0.2, final.to_string()
    assert final.loc["canary", "auc"] > 0.7
    # the likelihood-ratio attack on records (base model as reference) finds the training pairs
    # (measured: AUC 0.83-0.88 after 3 rounds; its TPR at 1% FPR swings from 0.03 to 0.55 between runs
    # of this small test, too few non-members to assert on, so the test holds AUC and TPR - FPR)
    attack = pd.read_csv(tmp_path / "nonprivate" / "attack.csv")
    record = attack[(attack["attack"] == "lira-record") & (attack["round"] == 3)].iloc[0]
    assert record["auc"] > 0.7 and record["tpr"] - record["fpr"] > 0.2, record.to_dict()
    assert set(attack["attack"]) == {
        "idia",
        "idia-replies",
        "lira-patient",
        "lira-patient-replies",
        "lira-record",
        "canary",
        "gradient-canary",
        "gradient-canary-replies",
    }
    scores = pd.read_csv(tmp_path / "nonprivate" / "attack_scores.csv")
    last = scores[(scores["round"] == 3) & (scores["attack"] == "canary")]
    assert len(last) == 64 and set(last["is_member"]) == {True, False}
    # the auditor's own pass over the saved models, with the same canary file, certifies the same
    run = tmp_path / "nonprivate"
    audit = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulations.commands",
            "audit",
            str(run),
            "--canaries",
            str(run / "data" / "canaries.csv"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert audit.returncode == 0, audit.stdout[-3000:] + audit.stderr[-3000:]
    # certifies the same scores: the run split its 5% over three randomised audits (canary patients, and
    # gradient canaries on the global model and on the replies) and four evaluations, the auditor's pass
    # over one audit and the four models
    again = pd.read_csv(run / "audit" / "attack.csv").set_index("round")["audited_epsilon"]
    during = audited[audited["attack"] == "canary"].set_index("round")["audited_epsilon"]
    for audits, got, table in ((3, during, scores), (1, again, pd.read_csv(run / "audit" / "attack_scores.csv"))):
        confidence = joint_confidence(rounds=4, audits=audits)
        expected = {
            r: audit_scores(
                g["score"].to_numpy(), g["is_member"].to_numpy(), delta=1e-5, confidence=confidence
            ).epsilon_lower_bound
            for r, g in table[table["attack"] == "canary"].groupby("round")
        }
        pd.testing.assert_series_equal(got, pd.Series(expected).rename_axis("round"), check_names=False, rtol=1e-6)
    assert (again >= during - 1e-12).all() and (again > during).any()  # one audit: less to correct for
    assert (run / "audit" / "roc.png").is_file()
