"""Every bad setting is refused by ``flower-simulation`` before Ray starts, naming the key.

Table-driven against the CLI's ``main`` (the console script), with Ray's entry point replaced by
a sentinel that fails the test if it is ever reached; one case also runs as a real process.
"""

import shutil
import subprocess
import sys

import flwr.simulation
import pandas as pd
import pytest

from simulations import cli

TINY = "num-sites=2 patients-per-site=6 images-per-patient=4"


class RayStarted(Exception):
    pass


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    def refuse(**kwargs):
        raise RayStarted(kwargs)

    monkeypatch.setattr(flwr.simulation, "run_simulation", refuse)


@pytest.fixture()
def escaping_manifest(small_manifest_path, tmp_path):
    shutil.copytree(small_manifest_path.parent, tmp_path / "d")
    path = tmp_path / "d" / "manifest.csv"
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    image = frame.loc[0, "filepath"]
    (tmp_path / image).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / "d" / image, tmp_path / image)  # the same image, one folder up
    frame.loc[0, "filepath"] = "../" + image
    frame.to_csv(path, index=False)
    return path


CASES = [
    (
        "dp-mode=microbach",
        None,
        "dp-mode: expected one of ['microbatch', 'unit', 'paper', 'nonprivate', 'distributed', 'cadp', 'maskdp', "
        "'mask-replace'], got 'microbach'",
    ),
    # distributed DP over secure aggregation (docs/privacy.md, "Distributed DP")
    ("dp-mode=distributed local-steps=3", None, "local-steps: dp-mode 'distributed' is one DP-SGD step over all sites"),
    (
        "dp-mode=distributed local-steps=1 secure-agg-threshold=3",
        None,
        "secure-agg-threshold: expected an integer in [2, 2]",
    ),
    (
        "dp-mode=distributed local-steps=1 secure-agg-bits=31",
        None,
        "secure-agg-bits: expected an integer in [2, 30] for 2 sites",
    ),
    (
        "dp-mode=distributed local-steps=1 secure-agg-bits=12",
        None,
        "secure-agg-bits: a sum of 12 bits may wrap around",
    ),
    (
        "dp-mode=distributed local-steps=1 secure-agg-colluders=2",
        None,
        "secure-agg-colluders: expected an integer in [0, 1]",
    ),
    (
        "dp-mode=distributed local-steps=1 microbatch-size=3",
        None,
        "microbatch_size: dp-mode distributed clips every unit",
    ),
    (
        "dp-mode=distributed local-steps=1 num-sites=1",
        None,
        "num-sites: secure aggregation needs at least 2 sites, got 1",
    ),
    ("secure-agg=true", None, "secure-agg: sums the sites' shares of client-level noise; set client-dp-epsilon > 0"),
    ("privacy-unit=patient", None, "privacy-unit: expected one of ['record', 'identity'], got 'patient'"),
    ("accountant=rdpp", None, "accountant: expected one of"),
    ("target-epsilon=nan", None, "target-epsilon: expected a finite number, got nan"),
    ("target-epsilon=inf", None, "target-epsilon: expected a finite number, got inf"),
    ("noise-multiplier=nan target-epsilon=0.0", None, "noise-multiplier: expected a finite number"),
    ("client-dp-epsilon=nan", None, "client-dp-epsilon: expected a finite number"),
    ("trainable=last-99", None, "trainable: last-99 but fedclip-tiny's vision tower has 2 blocks"),
    ("trainable='lora-0'", None, "trainable: 'lora-0' has LoRA rank 0; the rank must be >= 1"),
    ("trainable='lora-4-ffn'", None, "trainable: 'lora-4-ffn' names LoRA target 'ffn'; expected attn, mlp"),
    ("arch='RN50' trainable='lora-4'", None, "trainable: 'lora-4' needs transformer blocks in the image tower"),
    ("warm-start-epochs=0", None, "warm-start-epochs: expected an integer >= 1"),
    ("seed=-1", None, "seed: expected an integer >= 0, got -1"),
    (
        "site-budgets='hospital_9=2.0'",
        None,
        "site-budgets: no site named ['hospital_9']; the data's sites are ['hospital_0', 'hospital_1']",
    ),
    ("delta=0.5", None, "delta: 0.5 is above 1/(number of identity units at the smallest site, hospital_0) = 1/6"),
    ("delta=0.1 privacy-unit=record", None, "delta: 0.1 is above 1/(number of record units"),
    ("failure-quorum=0.0", None, "failure-quorum: expected a share in (0, 1]"),
    ("round-timeout=0", None, "round-timeout: expected seconds > 0"),
    ("messages-in-flight=-2", None, "messages-in-flight: expected an integer >= 0 (0 = all at once), got -2"),
    ("site-policy-file='/no/such/policy.toml'", None, "site-policy-file: file not found"),
    ("release-loss-noise=-1.0", None, "loss-noise: expected 0 (not released) or a finite value > 0"),
    ("", '{"client_resources": {"num_cpus": "two"}}', "client_resources.num_cpus: expected a number >= 0, got 'two'"),
    ("", '{"client_resources": {"num_cpus": 0}}', "client_resources.num_cpus: expected a number > 0"),
    ("", '{"client_resources": {"num_gpu": 1}}', "client_resources.num_gpu: unknown"),
]


@pytest.mark.parametrize(("run_config", "backend", "message"), CASES)
def test_bad_settings_are_refused_before_ray_naming_the_key(tmp_path, capsys, run_config, backend, message):
    argv = [
        "--app",
        "simulations.hospital_clip",
        "--output",
        str(tmp_path / "run"),
        "--run-config",
        f"{TINY} {run_config}",
    ] + (["--backend-config", backend] if backend else [])
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "run").exists()


def test_a_manifest_path_outside_its_folder_is_refused_unless_allowed(tmp_path, capsys, escaping_manifest):
    argv = [
        "--app",
        "simulations.hospital_clip",
        "--output",
        str(tmp_path / "run"),
        "--run-config",
        f"manifest='{escaping_manifest}' declared-units=8",
    ]
    assert cli.main(argv) == 2
    assert "is outside the manifest's folder" in capsys.readouterr().err
    with pytest.raises(RayStarted):  # allowed: validation passes and the run would start
        cli.main(argv[:-1] + [f"manifest='{escaping_manifest}' allow-outside-paths=true declared-units=8"])


def test_deployment_settings_are_refused_by_the_simulation(tmp_path, capsys, small_manifest_path):
    declared = [
        "--app",
        "simulations.hospital_clip",
        "--output",
        str(tmp_path / "run"),
        "--run-config",
        f"manifest='{small_manifest_path}' declared-units=6 sites='hospital_0,hospital_1'",
    ]
    assert cli.main(declared) == 2
    assert "sites: declared sites are a deployment" in capsys.readouterr().err
    placeholder = ["--app", "simulations.hospital_clip", "--output", str(tmp_path / "{run-id}"), "--run-config", TINY]
    assert cli.main(placeholder) == 2
    assert "output-dir: '{run-id}' is filled in on the deployment runtime" in capsys.readouterr().err


def test_an_explicit_override_lets_a_large_delta_through(tmp_path):
    argv = [
        "--app",
        "simulations.hospital_clip",
        "--output",
        str(tmp_path / "run"),
        "--run-config",
        f"{TINY} delta=0.5 allow-large-delta=true",
    ]
    with pytest.raises(RayStarted):
        cli.main(argv)


def test_a_real_process_exits_2_before_ray(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "simulations.cli",
        "--app",
        "simulations.hospital_clip",
        "--output",
        str(tmp_path / "run"),
        "--run-config",
        f"{TINY} privacy-unit=patient",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "privacy-unit: expected one of" in done.stderr
    assert "SuperNodes" not in done.stdout and "ray" not in done.stderr.lower()


def test_a_manifest_run_must_declare_its_public_site_size(tmp_path, capsys, small_manifest_path):
    argv = [
        "--app",
        "simulations.hospital_clip",
        "--output",
        str(tmp_path / "run"),
        "--run-config",
        f"manifest='{small_manifest_path}'",
    ]
    assert cli.main(argv) == 2
    assert "declared-units: with a manifest, declare the public number of units per site" in capsys.readouterr().err
    with pytest.raises(RayStarted):
        cli.main(argv[:-1] + [f"manifest='{small_manifest_path}' declared-units=8"])


def test_a_valid_distributed_plan_passes_every_check_and_would_start_ray(tmp_path):
    argv = ["--app", "simulations.hospital_clip", "--output", str(tmp_path / "run"), "--run-config"]
    with pytest.raises(RayStarted):
        cli.main(argv + [f"{TINY} dp-mode=distributed local-steps=1 secure-agg-threshold=2 secure-agg-colluders=1"])
    with pytest.raises(RayStarted):
        cli.main(argv + [f"{TINY} dp-mode=nonprivate client-dp-epsilon=4 secure-agg=true budget=inf"])
