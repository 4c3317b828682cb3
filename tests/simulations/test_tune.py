"""``fedclip tune`` as the user runs it: refusals before anything runs, the write-ahead charge that a
crash and resume keep, and the reported epsilons against independent computations."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from dp_accounting import dp_event as dpe
from dp_accounting.rdp import RdpAccountant

import simulations.hospital_clip
from fedclip.privacy.accountant import epsilon as composed_epsilon
from fedclip.privacy.ledger_store import LedgerStore
from simulations.tune.config import DEFAULT_TUNE_TOML, TuneConfig
from simulations.tune.search import SEARCH_FILE, draw_and_charge, search_event, select
from strategies.faults import CRASH_EXIT_CODE


def _small_base() -> str:
    """The app's small preset (simulations/hospital_clip/small.toml) as a search's [base], budget 8."""
    import tomllib

    preset = tomllib.loads((Path(simulations.hospital_clip.__file__).with_name("small.toml")).read_text())
    keys = {k: v for k, v in preset.items() if k not in ("output-dir", "cache-dir")}
    return "[base]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items()) + "budget = 8.0\n"


SMALL_BASE = _small_base()


def _write(tmp_path, tune: str, space: str = "lr = [0.005]", base: str = SMALL_BASE):
    path = tmp_path / "tune.toml"
    if "validation-patients" not in tune:  # 6 of the small data's 12 held-out patients
        tune += "\nvalidation-patients = 6"
    path.write_text(f"[tune]\noutput-dir = '{tmp_path / 'out'}'\n{tune}\n[space]\n{space}\n{base}")
    return path


def _tune(config, **env):
    import os

    return subprocess.run(
        [sys.executable, "-m", "simulations.commands", "tune", "--config", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "FEDCLIP_PROGRESS": "0", **env},
    )


def test_default_config_parses_and_plans_within_its_target():
    config = TuneConfig.from_toml(DEFAULT_TUNE_TOML)
    assert config.target_epsilon == 4.0 and len(config.points()) == 18


@pytest.mark.parametrize(
    "tune,space,message",
    [
        ("target-epsilon = 8.0", "seed = [0, 1]", "space.seed: not a tunable key"),
        ("target-epsilon = 8.0", "lr = []", "space.lr: expected a non-empty list"),
        ("target-epsilon = 8.0\nmean = 0.5", "lr = [0.005]", "mean"),
        ("target-epsilon = 8.0\nwhatever = 1", "lr = [0.005]", "unknown key"),
        ("target-epsilon = 8.0", "trainable = ['last-1', 'nothing-7']", "trainable"),
        ("target-epsilon = 8.0\nvalidation-patients = 12", "lr = [0.005]", "validation-patients"),
    ],
)
def test_bad_search_configs_are_refused_by_name(tmp_path, tune, space, message):
    with pytest.raises(ValueError, match=message):
        TuneConfig.from_toml(_write(tmp_path, tune, space))


def test_a_search_a_site_cannot_afford_is_refused_before_anything_runs(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text("[hospital_1]\nmax-epsilon-total = 6.0\n")
    config = _write(tmp_path, "target-epsilon = 8.0", base=SMALL_BASE + f"site-policy-file = '{policy}'\n")
    done = _tune(config)
    assert done.returncode == 1
    assert "hospital_1's policy refuses the search: max-epsilon-total" in done.stderr
    assert not (tmp_path / "out" / "state" / SEARCH_FILE).exists()  # nothing charged, nothing drawn
    over_budget = _write(tmp_path, "target-epsilon = 9.0")  # budget = 8 in [base]
    done = _tune(over_budget)
    assert done.returncode == 1 and "above its budget 8" in done.stderr and "hospital_0" in done.stderr
    distributed = _write(tmp_path, "target-epsilon = 8.0", base=SMALL_BASE + "dp-mode = 'distributed'\n")
    with pytest.raises(ValueError, match="distributed"):
        TuneConfig.from_toml(distributed)
    record_pairs = _write(tmp_path, "target-epsilon = 8.0", base=SMALL_BASE + "microbatch-size = 2\n")
    with pytest.raises(ValueError, match="local Gaussian DP with add-or-remove events"):
        TuneConfig.from_toml(record_pairs)


def test_selection_by_the_sites_released_loss_is_charged_and_picks_the_lowest(tmp_path):
    with pytest.raises(ValueError, match="release-loss-noise > 0"):
        TuneConfig.from_toml(_write(tmp_path, "target-epsilon = 8.0\nselection = 'site-loss'"))
    config = TuneConfig.from_toml(
        _write(
            tmp_path, "target-epsilon = 8.0\nselection = 'site-loss'", base=SMALL_BASE + "release-loss-noise = 5.0\n"
        )
    )
    (candidate,) = search_event(config, 1.0).candidates
    assert any(e.steps == 2 and e.sample_rate == 1.0 for e in candidate)  # the loss released in each of 2 rounds
    rows = [
        {"candidate": 0, "validation_zero_shot_accuracy": 0.9, "site_loss": 3.0},
        {"candidate": 1, "validation_zero_shot_accuracy": 0.5, "site_loss": 2.5},
    ]
    assert select(rows, selection="site-loss")["candidate"] == 1
    assert select(rows, selection="public")["candidate"] == 0
    assert select([], selection="public") is None  # a Poisson K of 0: nothing released


def test_the_draw_is_written_once_and_read_back(tmp_path):
    config = TuneConfig.from_toml(
        _write(tmp_path, "target-epsilon = 8.0\ndistribution = 'poisson'\nmean = 3.0", "lr = [0.002, 0.005, 0.01]")
    )
    saved = draw_and_charge(config, progress=lambda _: None)
    assert saved["k"] == len(saved["candidates"])
    assert all(c["point"]["lr"] in (0.002, 0.005, 0.01) for c in saved["candidates"])
    written = (tmp_path / "out" / "state" / SEARCH_FILE).read_text()
    assert draw_and_charge(config, progress=lambda _: None) == saved  # a resume draws nothing again
    assert (tmp_path / "out" / "state" / SEARCH_FILE).read_text() == written
    changed = TuneConfig(**{**config.__dict__, "target_epsilon": 7.0})
    with pytest.raises(ValueError, match="another configuration"):
        draw_and_charge(changed, progress=lambda _: None)


def test_a_search_killed_after_its_charge_resumes_without_charging_again(tmp_path):
    config = _write(tmp_path, "target-epsilon = 8.0\nmean = 1.0", base=SMALL_BASE + "tracking = 'tensorboard,mlflow'\n")
    out = tmp_path / "out"
    crashed = _tune(config, FEDCLIP_CRASH_AT="search-charged")
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr[-2000:]
    charged = (out / "state" / SEARCH_FILE).read_text()
    assert not (out / "candidates").exists()  # killed after the charge, before any candidate

    done = _tune(config)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming the search" in done.stdout and "Selected" in done.stdout
    assert (out / "state" / SEARCH_FILE).read_text() == charged  # the same draw, charged once

    saved = json.loads(charged)
    candidates = pd.read_csv(out / "candidates.csv")
    assert len(candidates) == saved["k"] == 1
    assert {"validation_zero_shot_accuracy", "test_zero_shot_accuracy"} <= set(candidates.columns)
    selected = json.loads((out / "selected.json").read_text())
    run = out / "candidates" / "0"
    run_config = json.loads((run / "config.json").read_text())
    assert run_config["resolved-noise-multiplier"] == pytest.approx(saved["noise_multiplier"])
    assert run_config["validation-patients"] == 6

    # the released model's epsilon: dp-accounting's RepeatAndSelectDpEvent over the candidate's event
    one = dpe.SelfComposedDpEvent(
        dpe.PoissonSampledDpEvent(run_config["sample-rate"], dpe.GaussianDpEvent(saved["noise_multiplier"])),
        run_config["num-rounds"] * run_config["local-steps"],
    )
    acc = RdpAccountant()
    acc.compose(dpe.RepeatAndSelectDpEvent(one, 1.0, 1.0))
    for site in ("hospital_0", "hospital_1"):
        assert selected["epsilon"]["released-model"][site] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
        assert selected["epsilon"]["released-model"][site] <= 8.0
    # the server's: what the candidate's own ledger charged, and what the run itself reported
    store = LedgerStore(run / "state" / "ledger.sqlite", delta=1e-5, create=False)
    rounds = pd.read_csv(run / "rounds.csv")
    for site in ("hospital_0", "hospital_1"):
        want = composed_epsilon(store.events(site), delta=1e-5)
        assert selected["epsilon"]["server"][site] == pytest.approx(want)
        assert want == pytest.approx(rounds.loc[rounds["site"] == site, "epsilon"].max(), rel=1e-6)
    store.close()
    summary = (out / "tune.md").read_text()
    assert "epsilon, released model (search included)" in summary and "operator's record" in summary

    from mlflow.tracking import MlflowClient  # the search as one MLflow experiment, a run per candidate

    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve()}")
    (logged,) = client.search_runs([client.get_experiment_by_name(f"tune {out}").experiment_id])
    assert logged.info.run_name == "candidate 0" and logged.data.params["validation-patients"] == "6"
    assert logged.data.metrics["validation_zero_shot_accuracy"] == pytest.approx(
        candidates["validation_zero_shot_accuracy"].iloc[0]
    )
