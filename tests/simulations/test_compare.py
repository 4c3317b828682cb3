"""A small central-vs-federated comparison, run as the user runs it, and its invariants."""

import json
import math
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from simulations.compare.config import DEFAULT_COMPARE_TOML, CompareConfig
from simulations.compare.runner import plan_runs
from simulations.compare.settings import DEFAULT_SETTINGS, SETTINGS

# five of the default grid's settings (each run costs about 45 s, most of it the run's fixed start-up):
# the baselines, both federated local units (record, identity) and client-level DP at the server; the
# others differ from these only in their overrides, tested below without a run
TESTED = ["pooled-nonprivate", "fed-nonprivate", "fed-local-record", "fed-local-identity", "fed-client"]
SMALL = """
[compare]
settings = {settings}
output-dir = "{out}"
epsilons = [1.0, 16.0]
seeds = [0]
parallel = 2

[base]
num-sites = 2
patients-per-site = 8
public-patients = 30
heldout-patients = 8
images-per-patient = 8
query-images-per-patient = 3
idia-queries = 3
idia-distractors = 20
warm-start-epochs = 5
local-steps = 30
microbatch-size = 2
num-rounds = 4
sample-rate = 0.5
tracking = "tensorboard,mlflow"
"""


def _compare(config_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simulations.commands", "compare", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=1500,
    )


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    base = tmp_path_factory.mktemp("compare")
    config = base / "compare.toml"
    config.write_text(SMALL.format(out=base / "out", settings=json.dumps(TESTED)))
    done = _compare(config)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return base / "out", config, done.stdout


def test_every_setting_ran_and_wrote_tables_and_plots(comparison):
    out, _, stdout = comparison
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 2 + 3 * 2  # two non-private settings, three private ones at two epsilons, one seed
    assert set(runs["setting"]) == set(TESTED)
    for name in ("table.csv", "table.md", "utility_vs_epsilon.png", "tpr_vs_epsilon.png"):
        assert (out / name).stat().st_size > 0
    from matplotlib.image import imread  # the attack plot has two panels: the global model, and the replies

    assert imread(out / "tpr_vs_epsilon.png").shape[1] > 1.8 * imread(out / "utility_vs_epsilon.png").shape[1]
    assert runs["replies_tpr"].notna().all() and runs["epsilon_server"].isna().all()
    table = pd.read_csv(out / "table.csv")
    units = dict(zip(table["setting"], table["unit"]))
    assert units["fed-local-record"] == "record" and units["fed-local-identity"] == "identity"
    assert units["fed-client"] == "site" and units["pooled-nonprivate"] == "none"
    assert "| fed-client |" in (out / "table.md").read_text() and "| setting |" in stdout


def test_the_comparison_opens_as_one_experiment_in_mlflow_and_tensorboard(comparison):
    """Read back with MLflow's and TensorBoard's own readers: every run, named, with its rounds."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = comparison
    planned = plan_runs(CompareConfig.from_toml(next(out.parent.glob("compare.toml"))))
    client = MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve()}")
    experiment = client.get_experiment_by_name(f"compare {out}")
    logged = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(logged) == {run.label for run in planned}  # two at a time into one store, none lost
    for run in planned:
        mlflow_run = logged[run.label]
        assert mlflow_run.info.status == "FINISHED" and mlflow_run.data.params["seed"] == "0"
        utility = pd.read_csv(run.folder / "utility.csv")
        history = client.get_metric_history(mlflow_run.info.run_id, "zero_shot_accuracy")
        assert [(m.step, round(m.value, 6)) for m in history] == [
            (int(r), round(v, 6)) for r, v in zip(utility["round"], utility["zero_shot_accuracy"])
        ]
        assert {a.path for a in client.list_artifacts(mlflow_run.info.run_id, "plots")} >= {"plots/utility.png"}
        events = EventAccumulator(str(run.folder / "tensorboard"))
        events.Reload()
        assert [e.step for e in events.Scalars("zero_shot_accuracy")] == utility["round"].tolist()
        assert "plots/attack" in events.Tags()["images"]


def test_epsilon_grows_as_noise_shrinks(comparison):
    out, _, _ = comparison
    runs = pd.read_csv(out / "runs.csv")
    for name, g in runs[runs["target_epsilon"].apply(math.isfinite)].groupby("setting"):
        g = g.sort_values("target_epsilon")
        column = "epsilon_site" if SETTINGS[name].unit == "site" else "epsilon_local"
        noise = "site_noise_multiplier" if SETTINGS[name].unit == "site" else "noise_multiplier"
        assert g[column].is_monotonic_increasing and g[column].iloc[0] < g[column].iloc[-1], name
        assert g[noise].iloc[0] > g[noise].iloc[-1], name
        assert (g[column] <= g["target_epsilon"] * (1 + 1e-9)).all(), name  # never past the target


def test_nonprivate_settings_leak_at_least_as_much_as_private_ones(comparison):
    out, _, _ = comparison
    runs = pd.read_csv(out / "runs.csv")
    private = runs[runs["target_epsilon"].apply(math.isfinite)]
    nonprivate = runs[~runs["target_epsilon"].apply(math.isfinite)]
    assert nonprivate["tpr"].min() > 0  # the non-private runs do leak in this configuration
    assert nonprivate["tpr"].min() >= private.loc[private["target_epsilon"] == 1.0, "tpr"].max()
    assert nonprivate["tpr"].max() >= private["tpr"].max()


def test_record_rows_show_what_they_mean_for_a_patient_and_the_publication_cost_is_stated(comparison):
    out, _, _ = comparison
    runs = pd.read_csv(out / "runs.csv")
    record = runs[runs["setting"] == "fed-local-record"].sort_values("target_epsilon")
    assert (record["largest_patient_pairs"] == 8).all()  # images-per-patient in the base config
    assert (record["patient_epsilon_group"] == 8 * record["epsilon_local"]).all()
    assert record["patient_delta_group"].iloc[-1] > 1  # at epsilon 16 group privacy says nothing about a patient
    assert runs.loc[runs["unit"] == "identity", "patient_epsilon_group"].isna().all()
    assert "per patient, record rows" in (out / "table.md").read_text()
    cost = pd.read_csv(out / "publication_cost.csv")
    identity_max = runs.loc[runs["unit"].str.contains("identity"), "epsilon_local"].max()
    assert math.isinf(cost["epsilon_all_runs"].iloc[0])  # non-private runs of the same patients are in it
    assert identity_max < cost["epsilon_identity_runs"].iloc[0] < runs["epsilon_local"].replace(math.inf, 0).sum() + 1
    assert "Publishing every run of this comparison" in (out / "table.md").read_text()


def test_a_second_invocation_reuses_every_finished_run(comparison):
    out, config, _ = comparison
    before = (out / "table.csv").read_text()
    again = _compare(config)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "8 already done, 0 to run" in again.stdout
    assert (out / "table.csv").read_text() == before


def test_report_writes_tables_from_the_finished_runs_only(comparison, tmp_path):
    out, config, _ = comparison
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    (next(partial.glob("fed-client/eps=1/seed=0")) / "done.json").unlink()  # a run still going
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulations.commands",
            "compare",
            "--config",
            str(config),
            "--output",
            str(partial),
            "--report",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "7 of 8 runs finished; incomplete: seed=0" in done.stdout
    runs = pd.read_csv(partial / "runs.csv")
    assert len(runs) == 7 and not ((runs["setting"] == "fed-client") & (runs["target_epsilon"] == 1.0)).any()
    empty = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulations.commands",
            "compare",
            "--config",
            str(config),
            "--output",
            str(tmp_path / "none"),
            "--report",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert empty.returncode == 1 and "no finished run" in empty.stderr


def test_rows_of_runs_finished_elsewhere_join_the_tables(comparison, tmp_path):
    """A grid split over machines or sessions: ``earlier-runs`` rows fill the runs not finished here."""
    from simulations.compare.results import write_outputs
    from simulations.compare.runner import finished_runs

    out, config, _ = comparison
    partial = tmp_path / "partial"
    shutil.copytree(out, partial, ignore=shutil.ignore_patterns("data", "models", "mlflow.db"))
    shutil.rmtree(next(partial.glob("fed-client/eps=1/seed=0")))  # run elsewhere: only its row is here
    merged = CompareConfig(
        **{
            **CompareConfig.from_toml(config).__dict__,
            "output_dir": str(partial),
            "earlier_runs": (str(out / "runs.csv"),),
        }
    )
    runs = finished_runs(merged, progress=lambda _: None)
    assert len(runs) == 7
    write_outputs(partial, runs, earlier=merged.earlier_runs)
    rows, full = pd.read_csv(partial / "runs.csv"), pd.read_csv(out / "runs.csv")
    assert len(rows) == 8
    key = ["setting", "target_epsilon", "seed"]
    pd.testing.assert_frame_equal(
        rows.sort_values(key).reset_index(drop=True), full.sort_values(key).reset_index(drop=True), check_like=True
    )
    assert "1 of the 8 runs are rows of `earlier-runs`" in (partial / "table.md").read_text()
    old = tmp_path / "old_runs.csv"
    full.drop(columns=["lira_patient_auc"]).to_csv(old, index=False)
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['lira_patient_auc'\]"):
        write_outputs(partial, runs, earlier=[old])
    with pytest.raises(ValueError, match="earlier-runs: file not found"):
        CompareConfig(**{**merged.__dict__, "earlier_runs": (str(tmp_path / "missing.csv"),)})


def test_compare_config_is_validated_before_anything_runs(tmp_path):
    assert len(plan_runs(CompareConfig.from_toml(DEFAULT_COMPARE_TOML))) == 2 * 3 + 4 * 3 * 3
    with pytest.raises(ValueError, match="compare.settings: unknown"):
        CompareConfig(settings=("fed-magic",))
    with pytest.raises(ValueError, match="compare.epsilons"):
        CompareConfig(epsilons=(0.0,))
    with pytest.raises(ValueError, match="num-roundz: unknown run-config key"):
        CompareConfig(base={"num-roundz": 3})
    with pytest.raises(ValueError, match="base.output-dir: set by the comparison"):
        CompareConfig(base={"output-dir": "x"})
    bad = tmp_path / "bad.toml"
    bad.write_text("[compare]\nepsilonz = [1.0]\n")
    with pytest.raises(ValueError, match="unknown key"):
        CompareConfig.from_toml(bad)


def test_every_default_setting_makes_a_run_config_the_app_accepts():
    """The settings the run above leaves out: each one's overrides at an epsilon are a valid run."""
    from simulations.hospital_clip.config import SimulationConfig

    untested = tuple(sorted(set(DEFAULT_SETTINGS) - set(TESTED)))
    assert untested == ("fed-local-client", "fed-local-unit", "pooled-dp")
    runs = plan_runs(CompareConfig(settings=untested, epsilons=(1.0, 16.0), seeds=(0,)))
    assert len(runs) == 6
    for run in runs:
        config = SimulationConfig.from_run_config(run.overrides)
        assert config.target_epsilon == run.epsilon and config.dp_mode != "nonprivate", run


def test_baselines_train_as_nonprivate_toml_and_private_settings_as_the_dp_defaults():
    """The gap DP leaves is measured against a tuned non-private baseline: its training keys come
    from nonprivate.toml; private settings (and client-level DP) keep the app's DP defaults."""
    from simulations.compare.settings import nonprivate_training

    base = CompareConfig(base={}).base_config()
    trained = nonprivate_training()
    assert trained and set(trained) <= {"trainable", "sample-rate", "lr", "optimizer"}
    for name in ("pooled-nonprivate", "fed-nonprivate"):
        assert SETTINGS[name].overrides(1.0, base).items() >= trained.items(), name
    for name in ("pooled-dp", "fed-local-identity", "fed-local-unit", "fed-client"):
        assert not set(SETTINGS[name].overrides(1.0, base)) & set(trained), name
    assert SETTINGS["fed-local-unit"].overrides(4.0, base)["dp-mode"] == "unit"
    # a training key the comparison sets in [base] holds for every run, the baselines too
    runs = plan_runs(CompareConfig(settings=("fed-nonprivate", "fed-local-identity"), base={"lr": 0.01}))
    assert {r.overrides["lr"] for r in runs} == {0.01}


def test_runs_go_seed_by_seed_and_share_the_cores(monkeypatch):
    """A comparison stopped part-way has whole seeds; parallel runs split the cores' threads."""
    from simulations.launch import thread_env

    runs = plan_runs(
        CompareConfig(settings=("fed-nonprivate", "fed-local-identity"), epsilons=(1.0, 8.0), seeds=(0, 1))
    )
    assert [r.seed for r in runs] == [0, 0, 0, 1, 1, 1]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert thread_env(2)["OMP_NUM_THREADS"] == "2" and thread_env(8)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert thread_env(2)["OMP_NUM_THREADS"] == "3"  # the user's own setting wins


def test_one_seed_shows_no_spread():
    from simulations.compare.results import _mean_spread

    assert _mean_spread(0.5, math.nan) == "0.500" and _mean_spread(0.5, 0.01) == "0.500 ± 0.010"


def test_the_table_states_the_relation_each_run_was_accounted_under():
    import pandas as pd

    from simulations.compare.results import relation_of
    from simulations.compare.settings import SETTINGS

    size_one = pd.DataFrame({"status": ["trained", "trained"], "relation": ["add_or_remove", "add_or_remove"]})
    hashed = pd.DataFrame({"status": ["trained", "refused"], "relation": ["replace_one", "add_or_remove"]})
    assert relation_of(SETTINGS["fed-local-identity"], size_one) == "add_or_remove"
    assert relation_of(SETTINGS["fed-local-identity"], hashed) == "replace_one"  # only rounds that trained
    assert relation_of(SETTINGS["fed-local-client"], size_one) == "add_or_remove + zero-out"
    assert relation_of(SETTINGS["fed-client"], size_one) == "zero-out"
    assert relation_of(SETTINGS["fed-nonprivate"], size_one) == "-"
    # runs that record what their epsilon is about: the neighbouring data sets, printed as they are
    about = size_one.assign(
        neighbours="add or remove one patient (one clipped term added or removed: add-or-remove accounting)"
    )
    assert relation_of(SETTINGS["fed-local-identity"], about) == about["neighbours"].iloc[0]


def test_the_table_prints_the_unit_with_its_neighbouring_data_sets():
    import pandas as pd

    from simulations.compare.results import METRICS, markdown_table

    row = {
        "setting": "fed-cadp",
        "target_epsilon": 4.0,
        "unit": "identity (images)",
        "relation": "replace one patient's images by as many other images (local, replace-one)",
        "seeds": 1,
        "epsilon_local": 4.0,
        "epsilon_site": math.nan,
        "patient_epsilon_group": math.nan,
        "patient_delta_group": math.nan,
        "noise_multiplier": 0.0,
        "site_noise_multiplier": 0.0,
        "sites": 4,
        "site_noise_on_average": 0.0,
        **{f"{m}_{s}": 0.1 for m in METRICS for s in ("mean", "std")},
    }
    table = markdown_table(pd.DataFrame([row]))
    assert "| unit and neighbouring data sets (what epsilon is about) |" in table.splitlines()[0]
    assert "| identity (images): replace one patient's images by as many other images (local, replace-one) |" in table
    distributed = {**row, "setting": "fed-distributed", "epsilon_server": 0.99, "epsilon_colluding": 1.45}
    table = markdown_table(
        pd.DataFrame([{**row, "epsilon_server": math.nan}, {**distributed, "epsilon_own_share": 2.5}])
    )
    assert "epsilon per adversary: server / server + colluders / a site's own share" in table.splitlines()[0]
    assert "| 0.99 / 1.45 / 2.50 |" in table and table.splitlines()[2].count("| - |") >= 1


def test_every_shipped_comparison_config_plans_valid_runs():
    """Each TOML under simulations/compare/ parses, and every run it plans is a valid hospital_clip
    config (the input-level settings included: their [base] makes the masks MaskDP needs)."""
    from pathlib import Path

    from simulations.hospital_clip.config import SimulationConfig

    files = sorted(Path("simulations/compare").glob("*.toml"))
    assert {f.name for f in files} >= {
        "default.toml",
        "audits.toml",
        "audits_tight.toml",
        "input_level.toml",
        "nonprivate_like_dp.toml",
        "many_sites.toml",
        "trainable.toml",
    }
    for path in files:
        for run in plan_runs(CompareConfig.from_toml(path)):
            cfg = SimulationConfig.from_run_config(run.overrides)
            if cfg.dp_mode in ("maskdp", "mask-replace"):
                assert cfg.identity_region < 1, path
    assert not set(CompareConfig().settings) & {"fed-cadp", "fed-maskdp", "fed-mask-replace"}  # opt-in
    with pytest.raises(ValueError, match="need a mask per image"):
        CompareConfig(settings=("fed-maskdp",))
    private = {
        r.setting: r.overrides for r in plan_runs(CompareConfig.from_toml("simulations/compare/input_level.toml"))
    }
    assert private["fed-cadp"]["dp-mode"] == "cadp" and private["fed-mask-replace"]["target-epsilon"] == 0.0
    like_dp = plan_runs(CompareConfig.from_toml("simulations/compare/nonprivate_like_dp.toml"))
    dp_default = SimulationConfig.from_run_config({})
    assert [r.overrides["seed"] for r in like_dp] == [0, 1, 2]
    for run in like_dp:  # the stronger reference: no DP, but what the DP settings train, at their rate
        cfg = SimulationConfig.from_run_config(run.overrides)
        assert cfg.dp_mode == "nonprivate" and (cfg.trainable, cfg.lr) == (dp_default.trainable, dp_default.lr)


AXIS = """
[compare]
output-dir = "{out}"
settings = ["fed-nonprivate", "fed-local-identity"]
epsilons = [4.0]
seeds = [0]
parallel = 2
trainable = ["bias", "lora-2"]

[base]
num-sites = 2
patients-per-site = 6
public-patients = 30
heldout-patients = 8
images-per-patient = 4
query-images-per-patient = 3
idia-queries = 3
idia-distractors = 20
warm-start-epochs = 1
local-steps = 3
microbatch-size = 3
num-rounds = 1
"""


def test_a_trainable_axis_runs_each_private_setting_once_per_set(tmp_path):
    """``trainable = [...]`` in [compare]: every private setting once per set, labelled
    ``setting@set`` in every table; the non-private baseline keeps its own training keys."""
    config = tmp_path / "axis.toml"
    config.write_text(AXIS.format(out=tmp_path / "out"))
    runs = plan_runs(CompareConfig.from_toml(config))
    assert sorted(r.label for r in runs) == [
        "fed-local-identity@bias eps=4 seed=0",
        "fed-local-identity@lora-2 eps=4 seed=0",
        "fed-nonprivate eps=none seed=0",
    ]
    from simulations.compare.settings import nonprivate_training

    baseline = next(r for r in runs if r.setting == "fed-nonprivate")
    assert baseline.overrides["trainable"] == nonprivate_training()["trainable"]
    # run the private cells only (two runs at once): the baseline is the plan's, as checked above
    config.write_text(AXIS.format(out=tmp_path / "out").replace('"fed-nonprivate", ', ""))
    done = _compare(config)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = pd.read_csv(tmp_path / "out" / "runs.csv").set_index("setting")
    assert set(table.index) == {"fed-local-identity@bias", "fed-local-identity@lora-2"}
    for name, trainable in (("fed-local-identity@bias", "bias"), ("fed-local-identity@lora-2", "lora-2")):
        assert table.loc[name, "unit"] == "identity" and table.loc[name, "epsilon_local"] <= 4.0
        saved = pd.read_json(tmp_path / "out" / name / "eps=4" / "seed=0" / "config.json", typ="series")
        assert saved["trainable"] == trainable
    assert "| fed-local-identity@lora-2 |" in (tmp_path / "out" / "table.md").read_text()


def test_a_trainable_axis_is_validated_before_anything_runs():
    with pytest.raises(ValueError, match="trainable: .*'lora-0'.*rank must be >= 1"):
        CompareConfig(trainable=("lora-0",))
    with pytest.raises(ValueError, match="base.trainable: the comparison's trainable axis sets it"):
        CompareConfig(trainable=("bias",), base={"trainable": "all"})
    with pytest.raises(ValueError, match="compare.trainable: expected distinct"):
        CompareConfig(trainable=("bias", "bias"))


def test_the_strongest_attack_on_people_is_the_best_of_the_final_round_on_the_model_and_the_replies():
    import pandas as pd

    from simulations.compare.results import final_attacks

    rows = [
        {"round": 6, "attack": "idia", "tpr": 0.5, "tpr_at_0.1pct_fpr": 0.10, "auc": 0.7},
        {"round": 6, "attack": "idia-replies", "tpr": 0.6, "tpr_at_0.1pct_fpr": 0.30, "auc": 0.8},
        {"round": 6, "attack": "lira-patient", "tpr": 0.5, "tpr_at_0.1pct_fpr": 0.20, "auc": 0.9},
        {"round": 6, "attack": "lira-record", "tpr": 0.9, "tpr_at_0.1pct_fpr": 0.90, "auc": 0.99},  # not people
        {"round": 5, "attack": "lira-patient-replies", "tpr": 0.9, "tpr_at_0.1pct_fpr": 0.95, "auc": 0.99},  # earlier
    ]
    final = final_attacks(pd.DataFrame(rows))
    assert final["patient_tpr_at_01pct_fpr"] == 0.30
    assert final["lira_patient_auc"] == 0.9 and math.isnan(final["lira_patient_replies_auc"])
    assert math.isnan(final_attacks(pd.DataFrame([{"round": 1, "attack": "canary"}]))["patient_tpr_at_01pct_fpr"])


def test_the_largest_bound_is_the_largest_of_every_attacks_indicative_and_certified_bounds():
    from simulations.compare.results import final_attacks

    rows = [
        {"round": 6, "attack": "idia", "epsilon_lower_bound": 0.4},
        {"round": 6, "attack": "canary", "epsilon_lower_bound": 0.1, "audited_epsilon": 0.9},
        {"round": 6, "attack": "gradient-canary-replies", "epsilon_lower_bound": 0.2, "gaussian_epsilon": 2.5},
        {"round": 5, "attack": "gradient-canary-replies", "gaussian_epsilon": 7.0},  # an earlier round
    ]
    assert final_attacks(pd.DataFrame(rows))["largest_attack_bound"] == 2.5
    assert final_attacks(pd.DataFrame(rows[:2]))["largest_attack_bound"] == 0.9
    assert math.isnan(final_attacks(pd.DataFrame([{"round": 1, "attack": "idia"}]))["largest_attack_bound"])
