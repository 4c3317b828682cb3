"""Canaries for a consortium's own data, through the ``fedclip canaries`` command a user runs."""

import subprocess
import sys

import pandas as pd
import pytest

from fedclip.data.canaries import CANARY_FILE, load_canaries
from fedclip.data.canary_maker import SITE_ROWS, make_site_canaries
from fedclip.data.manifest import load_manifest
from fedclip.data.synthetic import SyntheticConfig, generate


def _fedclip(*args):
    return subprocess.run([sys.executable, "-m", "fedclip.cli", *args], capture_output=True, text=True, timeout=300)


def test_each_site_gets_exactly_its_included_canaries_and_they_drop_into_its_manifest(tmp_path):
    hospital = generate(
        tmp_path / "hospital",
        SyntheticConfig(
            num_sites=1,
            patients_per_site=3,
            public_patients=2,
            heldout_patients=2,
            images_per_patient=2,
            query_images_per_patient=1,
        ),
    )
    done = _fedclip(
        "canaries",
        str(tmp_path / "c"),
        "--sites",
        "hospital_0,hospital_b",
        "--count",
        "40",
        "--image-size",
        "32",
        "--exclude",
        str(hospital),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "keep it" in done.stdout and "hospital_b: copy" in done.stdout
    canaries = load_canaries(tmp_path / "c" / CANARY_FILE)
    assert 0 < canaries.included.sum() < 40  # fair coins
    assert not set(canaries.frame["name"]) & set(load_manifest(hospital).frame["name"])
    everyone = canaries.frame
    for site in ("hospital_0", "hospital_b"):
        share = pd.read_csv(tmp_path / "c" / "sites" / site / SITE_ROWS)
        expected = everyone[(everyone["site"] == site) & (everyone["included"] == 1) & (everyone["split"] == "train")]
        assert sorted(share["patient_id"]) == sorted(expected["patient_id"])  # no excluded canary, no query image
        for rel in share["filepath"]:
            assert (tmp_path / "c" / "sites" / site / rel).is_file()
    # the hospital appends its share to its own manifest: it loads, the canaries train at hospital_0
    share_dir = tmp_path / "c" / "sites" / "hospital_0"
    subprocess.run(["cp", "-r", str(share_dir / "canaries"), str(hospital.parent)], check=True)
    merged = pd.concat([pd.read_csv(hospital), pd.read_csv(share_dir / SITE_ROWS)])
    merged.to_csv(hospital, index=False)
    frame = load_manifest(hospital).frame
    assert set(frame.loc[frame["patient_id"].str.startswith("C"), "site"]) <= {"hospital_0"}


def test_refusals_name_the_problem(tmp_path):
    make_site_canaries(
        tmp_path, sites=["a"], count=2, image_size=16, images_per_canary=1, query_images=1, secret=bytes(32)
    )
    with pytest.raises(ValueError, match="a second draw would replace the auditor's secret"):
        make_site_canaries(tmp_path, sites=["a"], count=2)
    with pytest.raises(ValueError, match="distinct site names"):
        make_site_canaries(tmp_path / "x", sites=["a", "a"], count=4)
    with pytest.raises(ValueError, match="at least 2 canaries"):
        make_site_canaries(tmp_path / "y", sites=["a"], count=1)
    bad = _fedclip("canaries", str(tmp_path / "z"), "--sites", "a", "--count", "1")
    assert bad.returncode == 2 and "count" in bad.stderr
