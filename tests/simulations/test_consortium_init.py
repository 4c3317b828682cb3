"""fedclip consortium-init: each party's folder holds its own rows and images only, and the files
each party hands to Flower (run config, node config) are accepted by the app's own checks.

The deployment tests (tests/deployment/test_loopback.py) run a consortium from these folders."""

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from flwr.common.config import parse_config_args

from fedclip.data.manifest import load_manifest
from simulations.consortium_init import AUDITOR, COORDINATOR, consortium_init
from simulations.hospital_clip.config import load_toml
from simulations.hospital_clip.server_app import default_run_config, resolve_config
from simulations.hospital_clip.site import check_node_keys


def _fedclip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "simulations.commands", *args], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def parties(small_manifest_path, warm_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("consortium") / "parties"
    done = _fedclip(
        "consortium-init", "--manifest", str(small_manifest_path), "--out", str(out), "--base", str(warm_checkpoint)
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "before the first run:" in done.stdout and "fedclip check-manifest" in done.stdout
    return out


def test_each_party_holds_its_own_rows_and_images_only(parties, small_manifest_path):
    source = load_manifest(small_manifest_path).frame
    sites = sorted(source.loc[source["split"] == "train", "site"].unique())
    assert sorted(p.name for p in parties.iterdir()) == sorted([COORDINATOR, AUDITOR, *sites])
    expected = {
        COORDINATOR: source[source["split"].isin(["public", "heldout"])],
        AUDITOR: source[source["split"].isin(["query", "heldout"])],
        **{s: source[(source["split"] == "train") & (source["site"] == s)] for s in sites},
    }
    for party, rows in expected.items():
        got = load_manifest(parties / party / "manifest.csv").frame  # every image inside the party's folder
        assert len(got) == len(rows) and list(got["title"]) == list(rows["title"]), party
        assert all(Path(p).is_relative_to(parties / party) for p in got["filepath"])
        assert (parties / party / "base.pt").is_file()
        # the images are the same bytes (linked or copied)
        assert Path(got["filepath"].iloc[0]).read_bytes() == Path(rows["filepath"].iloc[0]).read_bytes()
    # no hospital's image is in another party's folder
    inside = {
        party: {Path(p).stat().st_ino for p in load_manifest(parties / party / "manifest.csv").frame["filepath"]}
        for party in expected
    }
    for site in sites:
        for other in expected:
            if other != site:
                assert not inside[site] & inside[other], (site, other)
    check = _fedclip("check-manifest", str(parties / sites[0] / "manifest.csv"))
    assert check.returncode == 0 and "every image readable" in check.stdout, check.stderr


def test_the_run_config_and_node_configs_pass_the_apps_checks(parties):
    cfg = resolve_config(default_run_config(), load_toml(parties / COORDINATOR / "consortium.toml"))
    sites = cfg.declared_sites()
    assert list(sites) == sorted(p.name for p in parties.iterdir() if p.name not in (COORDINATOR, AUDITOR))
    assert Path(cfg.manifest).parent == parties / COORDINATOR and Path(cfg.pretrained).is_file()
    for site in sites:
        node = parse_config_args([(parties / site / "node-config.txt").read_text().strip()])
        check_node_keys(node)
        assert node["site"] == site and Path(node["manifest"]).parent == parties / site
        assert node["max-epsilon-total"] == 10.0  # a stated policy, the hospital's to edit
        patients = pd.read_csv(parties / site / "manifest.csv")["patient_id"].nunique()
        assert node["declared-units"] == patients


def test_bad_input_is_refused_before_anything_is_written(small_manifest_path, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_manifest_path.parent, data)
    frame = pd.read_csv(data / small_manifest_path.name, dtype=str, keep_default_na=False)
    patient = frame.loc[frame["split"] == "train", "patient_id"].iloc[0]
    rows = frame.index[frame["patient_id"] == patient]  # a patient whose rows name no hospital
    frame.loc[rows, "site"] = ""
    frame.to_csv(data / small_manifest_path.name, index=False)
    lines = [i + 2 for i in rows if frame.loc[i, "split"] == "train"][:10]
    with pytest.raises(ValueError, match=rf"'train' rows without a site \(lines \{lines}\)"):
        consortium_init(data / small_manifest_path.name, tmp_path / "out", warm_epochs=1)
    assert not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    done = _fedclip("consortium-init", "--manifest", str(small_manifest_path), "--out", str(tmp_path / "full"))
    assert done.returncode == 2 and "is not empty" in done.stderr
