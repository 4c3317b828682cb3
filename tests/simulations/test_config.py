import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from simulations.cli import parse_backend_config, parse_run_config
from simulations.hospital_clip.config import DEFAULT_TOML, SimulationConfig, load_toml
from simulations.hospital_clip.server_app import default_run_config

APP_DIR = Path(DEFAULT_TOML).parent


def test_default_toml_documents_every_key_with_the_dataclass_default():
    toml = load_toml(DEFAULT_TOML)
    defaults = SimulationConfig().to_run_config()
    assert set(toml) == set(defaults)
    assert SimulationConfig.from_run_config(toml) == SimulationConfig()


def test_nonprivate_config_is_valid_and_nonprivate():
    cfg = SimulationConfig.from_run_config({**load_toml(DEFAULT_TOML), **load_toml(APP_DIR / "nonprivate.toml")})
    assert cfg.dp_mode == "nonprivate" and cfg.output_dir != SimulationConfig().output_dir


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"num-roundz": 3}, "num-roundz: unknown run-config key"),
        ({"num-rounds": "three"}, "num-rounds: expected int"),
        ({"num-rounds": 0}, "num-rounds: expected an integer >= 1"),
        ({"warm-start-epochs": 0}, "warm-start-epochs: expected an integer >= 1"),
        ({"lr": True}, "lr: expected float"),
        ({"dp-mode": "ghost"}, "ghost"),
        ({"max-grad-norm": 0.0}, "max_grad_norm"),
        ({"budget": -1.0}, "budget: expected an epsilon > 0"),
        ({"site-budgets": "hospital_0=abc"}, "site-budgets"),
        ({"strategy": "fedfoo"}, "strategy: expected one of"),
        ({"name-lists": "klingon"}, "name-lists: expected one of"),
        ({"grad-engine": "fast"}, "grad-engine: expected one of"),
        ({"attack-replies": "last"}, "attack-replies: expected one of"),
        ({"identity-strength": 3.0}, "identity_strength: expected a weight in \\(0, 2\\]"),
        ({"idia-tau": 9}, "idia tau"),
        ({"idia-queries": 30}, "idia-queries: 30 query images per person, .* query-images-per-patient = 5"),
        ({"manifest": "/no/such/file.csv"}, "manifest: file not found"),
        ({"lira-references": -1}, "lira-references: expected an integer >= 0"),
        ({"lira-references": 2, "dp-mode": "distributed", "secure-agg": True}, "lira-references: .*distributed"),
        ({"trainable": "last-0"}, "trainable"),
        ({"client-dp-epsilon": 2.0}, "client-dp-epsilon: .* budget = inf"),  # default budget is finite
        ({"client-dp-epsilon": 2.0, "budget": float("inf"), "fraction-train": 0.5}, "fraction-train = 1.0"),
    ],
)
def test_bad_run_config_names_the_key(values, message):
    with pytest.raises(ValueError, match=message):
        SimulationConfig.from_run_config(values)


def test_run_config_strings_and_files():
    assert parse_run_config("num-rounds=3 dp-mode='paper' lr=0.01 resume=true budget=inf name=bare") == {
        "num-rounds": 3,
        "dp-mode": "paper",
        "lr": 0.01,
        "resume": True,
        "budget": float("inf"),
        "name": "bare",
    }
    assert parse_run_config(str(APP_DIR / "nonprivate.toml"))["dp-mode"] == "nonprivate"
    with pytest.raises(ValueError, match="expected key=value"):
        parse_run_config("num-rounds")
    # a preset file, then overrides: later items win, the file's other keys stay
    both = parse_run_config(f"{APP_DIR / 'small.toml'} num-rounds=1 output-dir=x")
    small = parse_run_config(str(APP_DIR / "small.toml"))
    assert both == {**small, "num-rounds": 1, "output-dir": "x"} and small["num-rounds"] != 1
    with pytest.raises(ValueError, match="file not found: nope.toml"):
        parse_run_config("nope.toml num-rounds=2")


def test_small_preset_is_small_and_valid():
    """The test preset stays a quick run: few patients, few rounds, and every key a real one."""
    cfg = SimulationConfig.from_run_config({**default_run_config(), **parse_run_config(str(APP_DIR / "small.toml"))})
    assert cfg.num_sites * cfg.patients_per_site <= 40 and cfg.num_rounds <= 3


def test_the_published_idia_preset_is_the_papers_and_valid_with_any_config():
    """Hintersdorf et al.'s settings: 21 templates, 30 query images, tau 1, on the default or small data."""
    published = parse_run_config(str(APP_DIR / "idia_published.toml"))
    for base in ({}, parse_run_config(str(APP_DIR / "small.toml"))):
        cfg = SimulationConfig.from_run_config({**default_run_config(), **base, **published})
        idia = cfg.idia()
        assert len(idia.templates) == 21 and len(set(idia.templates)) == 21 and "a photo of {name}" in idia.templates
        assert idia.num_queries == 30 == cfg.query_images_per_patient and idia.tau == 1


def test_backend_config_merges_client_resources():
    cfg = parse_backend_config('{"client_resources": {"num_gpus": 0.5}}', use_gpu=False)
    assert cfg["client_resources"] == {"num_cpus": 1, "num_gpus": 0.5}
    with pytest.raises(ValueError, match="backend-config"):
        parse_backend_config("{not json", use_gpu=False)


def test_cli_fails_before_ray_starts_naming_the_key(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "simulations.cli",
        "--app",
        "simulations.hospital_clip",
        "--run-config",
        "num-rounds=2 sample-rate=1.5",
        "--output",
        str(tmp_path / "run"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "sample_rate: expected a value in (0, 1]" in done.stderr
    assert "ray" not in done.stderr.lower() and not (tmp_path / "run").exists()


def test_every_field_has_a_kebab_key():
    assert all("-" not in f.name for f in fields(SimulationConfig))


def test_pyproject_declares_the_same_app_config_for_flwr_run():
    import tomllib

    pyproject = tomllib.loads((APP_DIR.parents[1] / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == load_toml(DEFAULT_TOML)
    components = pyproject["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": "simulations.hospital_clip.server_app:app",
        "clientapp": "simulations.hospital_clip.client_app:app",
    }
