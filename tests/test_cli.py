"""The user's first command, run as the user runs it."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from simulations.commands import main  # the installed `fedclip` command


def test_prepare_writes_data_checkpoint_and_table(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "fedclip.cli",
        "prepare",
        "--out",
        str(out),
        "--epochs",
        "3",
        "--num-sites",
        "2",
        "--patients-per-site",
        "3",
        "--public-patients",
        "12",
        "--heldout-patients",
        "4",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "[3/3] evaluating on held-out patients" in done.stdout
    table = pd.read_csv(out / "warmstart_eval.csv")
    assert table["model"].tolist() == ["random init", "warm start"]
    assert table["heldout_images"].tolist() == [20, 20]
    assert table["zero_shot_accuracy"].between(0, 1).all()
    assert (out / "data" / "manifest.csv").is_file()
    assert len(list((out / "cache").glob("warmstart-fedclip-tiny-*.pt"))) == 1


def test_bad_option_gives_a_clear_error(tmp_path):
    cmd = [sys.executable, "-m", "fedclip.cli", "data", "--out", str(tmp_path), "--num-sites", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "num_sites: expected an integer >= 1" in done.stderr


def test_data_command_names_patients_from_the_chosen_lists(tmp_path):
    from fedclip.data.names import first_and_surnames

    _, CENSUS_SURNAMES = first_and_surnames("census")

    cmd = [
        sys.executable,
        "-m",
        "fedclip.cli",
        "data",
        "--out",
        str(tmp_path),
        "--num-sites",
        "1",
        "--patients-per-site",
        "4",
        "--public-patients",
        "2",
        "--heldout-patients",
        "2",
        "--name-lists",
        "census",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    frame = pd.read_csv(tmp_path / "manifest.csv", dtype=str, keep_default_na=False)
    assert set(frame["name"].str.split(" ").str[-1]) <= set(CENSUS_SURNAMES)
    bad = subprocess.run(cmd[:-1] + ["klingon"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--name-lists" in bad.stderr


@pytest.mark.parametrize(("status", "code"), [("finished", 0), ("failed", 1), ("running", 3)])
def test_status_exit_codes_a_script_can_check(tmp_path, capsys, status, code):
    (tmp_path / "status.json").write_text(json.dumps({"status": status, "rounds": 2}))
    assert main(["status", str(tmp_path)]) == code
    assert json.loads(capsys.readouterr().out)["status"] == status
    assert main(["status", str(tmp_path / "nowhere")]) == 3
    assert "no status" in capsys.readouterr().err


def test_audit_and_spending_name_what_is_missing(tmp_path, capsys):
    assert main(["audit", str(tmp_path), "--targets", "t.csv"]) == 2
    assert f"run: {tmp_path} has no config.json" in capsys.readouterr().err
    assert main(["spending", str(tmp_path)]) == 2
    assert f"no ledger at {tmp_path / 'ledger.sqlite'}" in capsys.readouterr().err


def test_the_installed_command_has_every_command(capsys):
    import tomllib
    from pathlib import Path

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fedclip"] == "simulations.commands:main"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in (
        "prepare",
        "data",
        "warmstart",
        "compare",
        "audit",
        "site-worker",
        "canaries",
        "privatize",
        "gallery",
        "status",
        "spending",
    ):
        assert f"    fedclip {command} " in text, command
