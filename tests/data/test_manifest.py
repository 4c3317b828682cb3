import shutil
from pathlib import Path

import pandas as pd
import pytest

from fedclip.data.manifest import ManifestColumns, ManifestError, load_manifest
from fedclip.data.schema import MANIFEST_COLUMNS, Split


@pytest.fixture()
def copy(small_manifest_path, tmp_path) -> Path:
    """A private copy of the small data set that a test may damage."""
    shutil.copytree(small_manifest_path.parent, tmp_path / "d")
    return tmp_path / "d" / "manifest.csv"


def _edit(path: Path, fn) -> None:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    fn(frame)
    frame.to_csv(path, index=False)


def test_good_manifest_loads_with_absolute_paths_and_line_numbers(small_manifest, small_manifest_path):
    frame = small_manifest.frame
    assert tuple(frame.columns) == MANIFEST_COLUMNS + ("line",)
    assert len(frame) == len(pd.read_csv(small_manifest_path))
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in frame["filepath"])
    assert frame["line"].tolist() == list(range(2, len(frame) + 2))
    assert small_manifest.skipped == ()
    assert set(small_manifest.rows(Split.QUERY)["split"]) == {"query"}


def test_custom_column_names_and_tsv_with_optional_columns_absent(copy):
    frame = pd.read_csv(copy, dtype=str, keep_default_na=False)
    frame = frame.rename(columns={"filepath": "img", "title": "report", "patient_id": "person"})
    frame[["img", "report", "person"]].to_csv(copy.with_suffix(".tsv"), sep="\t", index=False)
    cols = ManifestColumns(
        image="img", caption="report", patient="person", name=None, site=None, condition=None, split=None
    )
    loaded = load_manifest(copy.with_suffix(".tsv"), columns=cols)
    assert len(loaded.frame) == len(frame)
    assert (loaded.frame["name"] == loaded.frame["patient_id"]).all()
    assert set(loaded.frame["split"]) == {"train"}


def test_missing_column_is_named(copy):
    _edit(copy, lambda f: f.__delitem__("title"))
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['title'\]"):
        load_manifest(copy)


def test_missing_manifest_file_is_named(tmp_path):
    with pytest.raises(ManifestError, match="manifest file not found"):
        load_manifest(tmp_path / "nope.csv")


@pytest.mark.parametrize(
    ("damage", "column", "problem"),
    [
        ("missing_image", "filepath", "image file not found"),
        ("unreadable_image", "filepath", "image file cannot be read as an image"),
        ("empty_caption", "title", "empty caption"),
        ("duplicate_image", "filepath", "duplicate image"),
        ("bad_split", "split", "unknown split"),
    ],
)
def test_bad_row_error_names_file_line_and_column(copy, damage, column, problem):
    frame = pd.read_csv(copy, dtype=str, keep_default_na=False)
    row = 5  # file line 7
    if damage == "missing_image":
        (copy.parent / frame.loc[row, "filepath"]).unlink()
    elif damage == "unreadable_image":
        (copy.parent / frame.loc[row, "filepath"]).write_bytes(b"not a png")
    else:
        _edit(
            copy,
            {
                "empty_caption": lambda f: f.__setitem__("title", f["title"].where(f.index != row, "  ")),
                "duplicate_image": lambda f: f.__setitem__(
                    "filepath", f["filepath"].where(f.index != row, f.loc[0, "filepath"])
                ),
                "bad_split": lambda f: f.__setitem__("split", f["split"].where(f.index != row, "validation")),
            }[damage],
        )
    with pytest.raises(ManifestError) as err:
        load_manifest(copy)
    message = str(err.value)
    assert f"{copy.resolve()}: line 7, column '{column}': {problem}" in message
    # the places a site may send: line, column and a fixed phrase, no path or value from the file
    places = err.value.places()
    assert places.startswith(f"manifest line 7, column '{column}': ")
    for value in [str(copy.parent), frame.loc[row, "filepath"], frame.loc[0, "filepath"], "validation"]:
        assert value not in places, (value, places)


def test_skipping_bad_rows_reports_every_skipped_row(copy):
    frame = pd.read_csv(copy, dtype=str, keep_default_na=False)
    (copy.parent / frame.loc[3, "filepath"]).unlink()
    _edit(copy, lambda f: f.__setitem__("title", f["title"].where(f.index != 10, "")))
    loaded = load_manifest(copy, skip_bad_rows=True)
    assert [(b.line, b.column) for b in loaded.skipped] == [(5, "filepath"), (12, "title")]
    assert len(loaded.frame) + len(loaded.skipped) == len(frame)
    assert 5 not in set(loaded.frame["line"]) and 12 not in set(loaded.frame["line"])


def test_patient_in_two_sites_always_fails(copy):
    frame = pd.read_csv(copy, dtype=str, keep_default_na=False)
    pid = frame.loc[frame["split"] == "train", "patient_id"].iloc[0]
    first = frame.index[frame["patient_id"] == pid][0]
    _edit(copy, lambda f: f.__setitem__("site", f["site"].where(f.index != first, "elsewhere")))
    with pytest.raises(ManifestError, match=f"column 'site': patient '{pid}' has several sites") as err:
        load_manifest(copy, skip_bad_rows=True)
    assert f"manifest line {first + 2}, column 'site': a patient with several sites" in err.value.places()
    assert pid not in err.value.places() and "elsewhere" not in err.value.places()


def test_patient_in_two_populations_fails(copy):
    frame = pd.read_csv(copy, dtype=str, keep_default_na=False)
    pid = frame.loc[frame["split"] == "public", "patient_id"].iloc[0]
    first = frame.index[frame["patient_id"] == pid][0]
    _edit(copy, lambda f: f.__setitem__("split", f["split"].where(f.index != first, "heldout")))
    with pytest.raises(ManifestError, match="several populations"):
        load_manifest(copy)


def test_paths_outside_the_manifest_folder_are_refused_unless_allowed(copy):
    frame = pd.read_csv(copy, dtype=str, keep_default_na=False)
    outside = copy.parent.parent / "elsewhere.png"
    shutil.copy(copy.parent / frame.loc[3, "filepath"], outside)
    for path in ("../elsewhere.png", str(outside)):
        _edit(copy, lambda f, p=path: f.__setitem__("filepath", f["filepath"].where(f.index != 3, p)))
        with pytest.raises(
            ManifestError, match=r"line 5, column 'filepath': image path .* is outside the manifest's folder"
        ):
            load_manifest(copy)
        loaded = load_manifest(copy, allow_outside_paths=True)
        assert str(outside.resolve()) in {str(Path(p).resolve()) for p in loaded.frame["filepath"]}


def test_a_directory_given_as_an_image_is_called_a_directory(copy):
    (copy.parent / "adir").mkdir()
    _edit(copy, lambda f: f.__setitem__("filepath", f["filepath"].where(f.index != 2, "adir")))
    with pytest.raises(ManifestError, match="line 4, column 'filepath': image path is a directory"):
        load_manifest(copy)
