import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fedclip.data.schema import CONDITIONS, MANIFEST_COLUMNS
from fedclip.data.synthetic import SyntheticConfig, generate
from tests.conftest import SMALL


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.relative_to(folder).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    cfg = SyntheticConfig(seed=3, num_sites=2, patients_per_site=3, public_patients=4, heldout_patients=3)
    generate(tmp_path / "a", cfg)
    generate(tmp_path / "b", cfg)
    generate(tmp_path / "c", SyntheticConfig(**{**cfg.__dict__, "seed": 4}))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_manifest_has_open_clip_columns_and_every_image_exists(small_manifest_path):
    frame = pd.read_csv(small_manifest_path, dtype=str, keep_default_na=False)
    assert tuple(frame.columns) == MANIFEST_COLUMNS
    assert all((small_manifest_path.parent / p).is_file() for p in frame["filepath"])
    counts = frame["split"].value_counts().to_dict()
    assert counts == {"public": 60 * 6, "train": 24 * 6, "query": 24 * 4, "heldout": 20 * 4}
    assert set(frame["condition"]) <= set(CONDITIONS)


def test_every_caption_names_its_patient_and_finding(small_manifest_path):
    frame = pd.read_csv(small_manifest_path, dtype=str, keep_default_na=False)
    for title, name, condition in zip(frame["title"], frame["name"], frame["condition"]):
        assert name in title
        assert condition.split()[-1] in title  # every phrasing keeps the condition's key word
    assert frame.groupby("patient_id")["name"].nunique().max() == 1
    assert frame.drop_duplicates("patient_id")["name"].is_unique


def test_populations_are_disjoint_and_patients_never_span_sites(small_manifest_path):
    frame = pd.read_csv(small_manifest_path, dtype=str, keep_default_na=False)
    population = frame["split"].replace({"query": "train"})
    assert frame.assign(pop=population).groupby("patient_id")["pop"].nunique().max() == 1
    members = frame[frame["split"].isin(["train", "query"])]
    assert members.groupby("patient_id")["site"].nunique().max() == 1
    assert (members["site"] != "").all()
    assert (frame.loc[frame["split"].isin(["public", "heldout"]), "site"] == "").all()
    assert members["site"].nunique() == SMALL.num_sites


def test_query_images_are_never_training_images(small_manifest_path):
    frame = pd.read_csv(small_manifest_path, dtype=str, keep_default_na=False)
    train = set(frame.loc[frame["split"] == "train", "filepath"])
    query = frame[frame["split"] == "query"]
    assert train.isdisjoint(query["filepath"])
    assert set(query["patient_id"]) == set(frame.loc[frame["split"] == "train", "patient_id"])


def test_a_patients_images_look_alike(small_manifest_path):
    """The identity signal IDIA exploits: the nearest image (by mean colour per quadrant) of a
    query image belongs to the same patient far more often than chance."""
    frame = pd.read_csv(small_manifest_path, dtype=str, keep_default_na=False)
    frame = frame[frame["split"].isin(["train", "query"])]
    feats = []
    for p in frame["filepath"]:
        img = np.asarray(Image.open(small_manifest_path.parent / p), dtype=np.float32)
        feats.append(img.reshape(2, 16, 2, 16, 3).mean(axis=(1, 3)).ravel())
    x = np.stack(feats)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    ids = frame["patient_id"].to_numpy()
    hit = (ids[d.argmin(1)] == ids).mean()
    assert hit > 0.5, hit  # chance is about 1 / 24


def test_site_skew_changes_site_sizes_but_keeps_the_total(tmp_path):
    cfg = SyntheticConfig(
        seed=1,
        num_sites=4,
        patients_per_site=10,
        public_patients=0,
        heldout_patients=0,
        site_skew=0.3,
        images_per_patient=1,
        query_images_per_patient=1,
    )
    frame = pd.read_csv(generate(tmp_path, cfg), dtype=str, keep_default_na=False)
    sizes = frame[frame["split"] == "train"].groupby("site")["patient_id"].nunique()
    assert sizes.sum() == 40
    assert sizes.min() >= 2 and sizes.max() > sizes.min()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_sites", 0),
        ("patients_per_site", 0),
        ("public_patients", -1),
        ("image_size", 8),
        ("site_skew", -1.0),
        ("noise", 1.5),
        ("name_lists", "klingon"),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**{field: value})


def test_census_names_give_most_patients_their_own_surname(tmp_path):
    """The point of the census lists: at hospital scale a surname mostly belongs to one patient
    (the short lists put each surname on several patients), which is what lets names leak."""
    from fedclip.data.names import first_and_surnames

    (_, CENSUS_SURNAMES), (_, SHORT_SURNAMES) = first_and_surnames("census"), first_and_surnames("short")

    def surnames(lists: str) -> pd.Series:
        cfg = SyntheticConfig(
            num_sites=1,
            patients_per_site=300,
            public_patients=0,
            heldout_patients=0,
            images_per_patient=1,
            query_images_per_patient=1,
            name_lists=lists,
        )
        frame = pd.read_csv(generate(tmp_path / lists, cfg), dtype=str, keep_default_na=False)
        return frame.groupby("patient_id")["name"].first().str.split(" ").str[-1]

    census, short = surnames("census"), surnames("short")
    assert set(census) <= set(CENSUS_SURNAMES) and set(short) <= set(SHORT_SURNAMES)
    assert census.nunique() > 0.7 * len(census)
    assert short.nunique() < 0.6 * len(short)
