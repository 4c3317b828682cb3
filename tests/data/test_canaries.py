"""Canary patients: made like members, half of them (by the auditor's secret) in the manifest."""

import hashlib

import pandas as pd
import pytest

from fedclip.data.canaries import CANARY_FILE, draw_inclusion, load_canaries
from fedclip.data.synthetic import SyntheticConfig, generate

CFG = SyntheticConfig(
    seed=5,
    num_sites=2,
    patients_per_site=4,
    public_patients=4,
    heldout_patients=3,
    images_per_patient=3,
    query_images_per_patient=2,
)
SECRET = bytes(range(32))


def _with(cfg: SyntheticConfig, **changes) -> SyntheticConfig:
    return SyntheticConfig(**{**cfg.__dict__, **changes})


def test_canaries_leave_every_other_patient_as_it_was(tmp_path):
    plain = pd.read_csv(generate(tmp_path / "plain", CFG))
    with_canaries = pd.read_csv(generate(tmp_path / "canaries", _with(CFG, canaries=10), canary_secret=SECRET))
    others = with_canaries[~with_canaries["patient_id"].str.startswith("C")].reset_index(drop=True)
    pd.testing.assert_frame_equal(others, plain)
    for rel in plain["filepath"]:  # the same images, byte for byte
        assert (tmp_path / "plain" / rel).read_bytes() == (tmp_path / "canaries" / rel).read_bytes()


def test_only_included_canaries_train_and_the_auditor_file_has_them_all(tmp_path):
    manifest = pd.read_csv(generate(tmp_path, _with(CFG, canaries=10), canary_secret=SECRET), keep_default_na=False)
    canaries = load_canaries(tmp_path / CANARY_FILE)
    included = canaries.included
    assert len(included) == 10 and list(included) == list(draw_inclusion(10, secret=SECRET))
    trained = set(manifest.loc[manifest["patient_id"].str.startswith("C"), "patient_id"])
    assert trained == set(included[included].index)
    in_manifest = manifest[manifest["patient_id"].str.startswith("C")]
    assert set(in_manifest["split"]) == {"train"}  # their query photos stay with the auditor
    assert set(in_manifest["site"]) <= {"hospital_0", "hospital_1"}
    frame = canaries.frame
    assert set(frame["split"]) == {"train", "query"}
    assert not set(frame["name"]) & set(manifest.loc[~manifest["patient_id"].str.startswith("C"), "name"])
    assert (tmp_path / (CANARY_FILE + ".secret")).read_text().strip() == SECRET.hex()


def test_inclusion_comes_from_the_os_unless_a_secret_is_given(tmp_path):
    a = generate(tmp_path / "a", _with(CFG, canaries=40))
    b = generate(tmp_path / "b", _with(CFG, canaries=40))
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b)]
    assert digest[0] != digest[1]  # two data sets, two draws (40 coins agree by chance with probability 2^-40)
    assert draw_inclusion(1000, secret=SECRET).mean() == pytest.approx(0.5, abs=0.06)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        draw_inclusion(4, secret=b"short")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: f.drop(columns=["included"]), r"lacks column\(s\) \['included'\]"),
        (
            lambda f: f.assign(included=f["included"].astype(str).replace("1", "yes")),
            "line .*: included must be 0 or 1",
        ),
        (lambda f: f[f["split"] != "train"], "has no 'train' rows to score"),
    ],
)
def test_a_bad_canary_file_is_refused_naming_the_problem(tmp_path, edit, message):
    generate(tmp_path, _with(CFG, canaries=4), canary_secret=SECRET)
    path = tmp_path / CANARY_FILE
    edit(pd.read_csv(path, dtype=str, keep_default_na=False)).to_csv(path, index=False)
    with pytest.raises(ValueError, match=f"canary-file: .*{message}"):
        load_canaries(path)
