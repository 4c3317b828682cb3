"""A real simulation, as a user runs it: flower-simulation, Ray, 2 sites, then a resume."""

import json
import os
import sqlite3
import subprocess
import sys

import pandas as pd
import pytest

from fedclip.privacy.ledger_store import LedgerStore

TINY = (
    "num-sites=2 patients-per-site=6 public-patients=30 heldout-patients=8 images-per-patient=4 "
    "query-images-per-patient=3 idia-queries=3 idia-distractors=20 warm-start-epochs=3 local-steps=2 "
    "microbatch-size=3 target-epsilon=0.0 noise-multiplier=1.0 budget=inf"
)


def _simulate(out, cache, extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "simulations.cli",
        "--app",
        "simulations.hospital_clip",
        "--output",
        str(out),
        "--run-config",
        f"{TINY} cache-dir='{cache}' {extra}",
        "--backend-config",
        '{"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}',
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=420, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("sim")
    out, cache = base / "run", base / "cache"
    first = _simulate(out, cache, "num-rounds=1 lira-references=1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    (base / "first.stdout").write_text(first.stdout)  # the console, for test_the_console_*
    (base / "first.stderr").write_text(first.stderr)
    assert "round 1/1" in first.stdout
    # the attacker's shadow federation (one), trained before round 1 and again on resuming (another recipe)
    assert "lira: training 1 reference model on the public population (shadow federations of 2 sites" in first.stdout
    with sqlite3.connect(out / "state" / "ledger.sqlite") as db:
        after_first = db.execute("SELECT COUNT(*) FROM charges").fetchone()[0]
    # the resumed run as if on a terminal: a bar of rounds, and each site's local steps drawn by Ray
    second = _simulate(out, cache, "num-rounds=2 resume=true lira-references=1", env={"FEDCLIP_PROGRESS": "1"})
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    (base / "second.stderr").write_text(second.stderr)
    assert "resuming after round 1" in second.stdout and "round 2/2" in second.stdout
    # two rounds now, not one: the saved reference scores are of another recipe, and say so
    assert "saved scores not used: trained with another recipe" in second.stdout
    return out, after_first


def test_run_folder_has_every_table_plot_and_the_summary(run_dir):
    out, _ = run_dir
    for name in (
        "config.json",
        "rounds.csv",
        "attack.csv",
        "attack_sites.csv",
        "utility.csv",
        "summary.md",
        "epsilon.png",
        "attack.png",
        "utility.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    config = json.loads((out / "config.json").read_text())
    assert config["num-rounds"] == 2 and config["resolved-noise-multiplier"] == 1.0
    summary = (out / "summary.md").read_text()
    assert "adding or removing one patient" in summary and "IDIA" in summary
    assert "no count, loss or other value computed from its data" in summary and "NOT PRIVATE" not in summary
    assert config["private-against-the-server"] is True
    assert json.loads((out / "status.json").read_text())["status"] == "finished"


def test_where_the_time_goes_server_and_each_site_own(run_dir):
    """timings.csv: each round once (a resume does not repeat round 1), a train phase for every
    trained round; each site's own site_timings.csv in its folder, its local steps inside its handling."""
    out, _ = run_dir
    server = pd.read_csv(out / "timings.csv")
    assert list(server["round"]) == [0, 1, 2]
    assert (server.loc[server["round"] > 0, "train_phase_seconds"] > 0).all()
    for site in ("hospital_0", "hospital_1"):
        own = pd.read_csv(out / "sites" / site / "site_timings.csv")
        assert list(own["round"]) == [1, 2]
        assert ((own["train_seconds"] > 0) & (own["handle_seconds"] >= own["train_seconds"])).all()


def test_rounds_csv_composes_epsilon_per_site_across_rounds(run_dir):
    out, after_first = run_dir
    rounds = pd.read_csv(out / "rounds.csv")
    assert list(rounds.columns[:12]) == [
        "round",
        "site",
        "status",
        "epsilon",
        "delta",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "privacy_unit",
        "relation",
        "train_loss",
        "selected",
    ]
    assert sorted(rounds["round"].unique()) == [1, 2] and sorted(rounds["site"].unique()) == [
        "hospital_0",
        "hospital_1",
    ]
    assert rounds["selected"].all() and (rounds["relation"] == "replace_one").all()
    # every row says what its epsilon is about: the data sets, and what is covered
    assert (
        rounds["neighbours"] == "add or remove one patient (one fixed micro-batch's clipped term replaced: "
        "replace-one accounting)"
    ).all()
    assert (rounds["covers"] == "the patient's image-report pairs, in every update and released statistic").all()
    assert (rounds["status"] == "trained").all() and rounds["train_loss"].isna().all()  # no loss released by default
    for _, g in rounds.groupby("site"):
        eps = g.sort_values("round")["epsilon"].tolist()
        assert 0 < eps[0] < eps[1]
    # the ledger holds one event per site and round, written across the interruption
    assert after_first == 2
    store = LedgerStore(out / "state" / "ledger.sqlite", delta=1e-5)
    assert sorted(store.rounds()) == [("hospital_0", 1), ("hospital_0", 2), ("hospital_1", 1), ("hospital_1", 2)]
    final = rounds[rounds["round"] == 2].set_index("site")["epsilon"]
    for site in final.index:
        assert store.ledger(site).epsilon() == pytest.approx(final[site])
        # every site kept its own ledger, and it agrees with the server's, event for event
        own = LedgerStore(out / "sites" / site / "ledger.sqlite", delta=1e-5)
        assert own.events(site) == store.events(site) and len(own.events(site)) == 2
        assert {r["status"] for r in own.rows()} == {"confirmed"}


def test_attack_and_utility_rows_per_round(run_dir):
    out, _ = run_dir
    every, utility = pd.read_csv(out / "attack.csv"), pd.read_csv(out / "utility.csv")
    assert sorted(set(every["attack"])) == [
        "idia",
        "idia-replies",
        "lira-patient",
        "lira-patient-replies",
        "lira-record",
    ]
    for name, rows in every.groupby("attack"):
        # the sites' replies are attacked in each run's last round: round 1, then the resumed run's round 2
        assert rows["round"].tolist() == ([1, 2] if name.endswith("-replies") else [0, 1, 2]), name
    on_replies = every[every["attack"] == "idia-replies"]
    assert (on_replies["members"] == 12).all() and (on_replies["non_members"] == 8).all()
    scores = pd.read_csv(out / "attack_scores.csv")
    assert scores[scores["attack"] == "idia-replies"].groupby("round").size().tolist() == [20, 20]
    assert utility["round"].tolist() == [0, 1, 2]
    people = every[every["attack"] == "lira-patient"]
    assert (people["members"] == 12).all() and (people["non_members"] == 8).all()  # IDIA's targets
    attack = every[every["attack"] == "idia"]
    assert {"tpr", "fpr", "precision", "recall", "accuracy", "epsilon_lower_bound", "max_site_epsilon"} <= set(
        attack.columns
    )
    assert attack["tpr"].between(0, 1).all() and (attack["epsilon_lower_bound"] >= 0).all()
    assert attack["max_site_epsilon"].is_monotonic_increasing and attack["max_site_epsilon"].iloc[0] == 0
    assert (attack["members"] == 12).all() and (attack["non_members"] == 8).all()
    sites = pd.read_csv(out / "attack_sites.csv")
    assert set(sites["site"]) == {"hospital_0", "hospital_1"}
    assert utility["zero_shot_accuracy"].between(0, 1).all()


def test_rerunning_into_a_finished_folder_without_resume_is_refused(run_dir, tmp_path):
    out, _ = run_dir
    done = _simulate(out, tmp_path / "cache", "num-rounds=2")
    assert done.returncode != 0
    assert "already holds a run; pass resume=true" in done.stdout + done.stderr


def test_a_site_that_refuses_stops_the_run_naming_it(tmp_path):
    policy = tmp_path / "policies.toml"
    policy.write_text("[hospital_1]\nmin-noise-multiplier = 5.0\n")
    out = tmp_path / "run"
    result = _simulate(out, tmp_path / "cache", f"num-rounds=2 site-policy-file='{policy}'")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "hospital_1 refused" in result.stderr and "min-noise-multiplier" in result.stderr
    rounds = pd.read_csv(out / "rounds.csv")
    assert rounds.set_index("site")["status"].to_dict() == {"hospital_0": "trained", "hospital_1": "refused"}
    assert json.loads((out / "status.json").read_text())["status"] == "failed"
    assert "The run stopped" in (out / "summary.md").read_text()
    # the refusal keeps the server's charge; the site itself spent nothing
    store = LedgerStore(out / "state" / "ledger.sqlite", delta=1e-5)
    assert store.ledger("hospital_1").epsilon() > 0
    own = out / "sites" / "hospital_1" / "ledger.sqlite"
    assert not own.exists() or LedgerStore(own, delta=1e-5).events("hospital_1") == ()
    # the operator's and the site's view: fedclip status names the site and the rule, spending.md too
    status = _status(out)
    assert status.returncode == 1
    refused = json.loads(status.stdout)["sites-not-trained"]["hospital_1"]
    assert refused["refused"] == 1 and "min-noise-multiplier" in refused["last"]["reason"]
    spending = (out / "sites" / "hospital_1" / "spending.md").read_text()
    assert "policy refused (1; nothing charged)" in spending and "| min-noise-multiplier |" in spending


def _status(out) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simulations.commands", "status", str(out)], capture_output=True, text=True, timeout=120
    )


def test_a_site_that_fails_stops_the_run_naming_it_and_the_error(tmp_path):
    out = tmp_path / "run"
    (out / "sites").mkdir(parents=True)
    (out / "sites" / "hospital_0").write_text("not a folder")  # hospital_0 cannot keep its ledger: a real fault
    result = _simulate(out, tmp_path / "cache", "num-rounds=2")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "hospital_0 failed" in result.stderr and "Error" in result.stderr
    rounds = pd.read_csv(out / "rounds.csv")
    assert rounds.set_index("site")["status"].to_dict() == {"hospital_0": "failed", "hospital_1": "trained"}
    assert rounds["round"].tolist() == [1, 1]  # the run stopped after the failed round
    store = LedgerStore(out / "state" / "ledger.sqlite", delta=1e-5)
    assert store.ledger("hospital_0").epsilon() > 0  # the failed site's planned round stays charged
    failed = json.loads(_status(out).stdout)["sites-not-trained"]["hospital_0"]
    assert failed["failed"] == 1 and "hospital_0 failed" in failed["last"]["reason"]


NOISE = (
    "There is a performance drop",
    "DEPRECATED FEATURE",
    "Optimal order is the largest alpha",
    "Tip: In future versions of Ray",
    "No pretrained weights loaded",
    "fraction_evaluate is set to 0.0",
)


def test_the_console_prints_each_line_once_without_known_noise_and_ends_with_a_table(run_dir):
    out, _ = run_dir
    stdout, stderr = (out.parent / "first.stdout").read_text(), (out.parent / "first.stderr").read_text()
    for text in NOISE:  # fedclip/console.py silences these by their text, in every process of the run
        assert text not in stdout + stderr, text
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), [line for line in lines if lines.count(line) > 1]
    header = next(line for line in lines if "zero-shot" in line and "recall@1" in line and "max eps" in line)
    assert "idia AUC" in header and "lira-record AUC" in header
    assert lines.index(header) < lines.index(next(line for line in lines if line.startswith("done:")))


def test_progress_bars_only_where_someone_watches(run_dir):
    """The first run's stderr is a pipe: no bars. The resumed run said FEDCLIP_PROGRESS=1: a bar of
    rounds (resumed at round 1 of 2) and each site's local steps, drawn through Ray's tqdm_ray."""
    out, _ = run_dir
    first, second = (out.parent / "first.stderr").read_text(), (out.parent / "second.stderr").read_text()
    assert "rounds: " not in first.replace("Number of rounds: ", "") and "%|" not in first
    assert "rounds: 100%" in second
    for site in ("hospital_0", "hospital_1"):
        assert f"{site} round 2: 100%" in second, second[-2000:]
