"""Load and validate an image-caption manifest (CSV or TSV) in open_clip's convention.

The synthetic generator writes this format, and a user's own data in the same form drops in:
column names are configurable, relative image paths resolve against the manifest's folder.
Every problem names the file, the line and the column. Nothing is dropped silently: bad rows
raise, or, with ``skip_bad_rows=True``, are skipped and listed in ``Manifest.skipped``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError

from fedclip.data.schema import MANIFEST_COLUMNS, MASK_COLUMN, Split

_POPULATION = {Split.PUBLIC: "public", Split.TRAIN: "member", Split.QUERY: "member", Split.HELDOUT: "heldout"}


class ManifestError(ValueError):
    """A manifest that cannot be used as it is; the message names file, line and column.

    ``rows`` holds the same places without any value from the file: (line, column, kind), the
    kind a fixed phrase. A site may send these to the server where the message (paths, file names,
    ids) must stay at the site (``simulations.hospital_clip.site_errors``)."""

    def __init__(self, message: str, *, rows: tuple[tuple[int, str, str], ...] = ()) -> None:
        super().__init__(message)
        self.rows = rows

    def places(self, limit: int = 10) -> str:
        """'manifest line 5, column 'filepath': unreadable image; ...', or '' without rows."""
        shown = "; ".join(
            f"manifest line {line}, column '{column}': {kind}" for line, column, kind in self.rows[:limit]
        )
        return shown + (f"; and {len(self.rows) - limit} more" if len(self.rows) > limit else "")


@dataclass(frozen=True)
class ManifestColumns:
    """Which column of the user's file holds each field. ``None`` marks an optional field absent:
    no name (the patient id is used as the name), no site (one site), no condition (no zero-shot
    utility), no split (every row is a training row)."""

    image: str = "filepath"
    caption: str = "title"
    patient: str = "patient_id"
    name: str | None = "name"
    site: str | None = "site"
    condition: str | None = "condition"
    split: str | None = "split"

    def mapping(self) -> dict[str, str]:
        """User column -> canonical column, for the columns that are present."""
        pairs = zip(
            (self.image, self.caption, self.patient, self.name, self.site, self.condition, self.split),
            MANIFEST_COLUMNS,
        )
        return {user: canon for user, canon in pairs if user is not None}


@dataclass(frozen=True)
class BadRow:
    """One rejected row: ``line`` is the line in the file, the header being line 1."""

    line: int
    column: str
    problem: str
    kind: str = ""  # a fixed phrase, no value from the file (what a site may tell the server)

    def describe(self, source: Path) -> str:
        return f"{source}: line {self.line}, column '{self.column}': {self.problem}"


@dataclass(frozen=True)
class Manifest:
    """A validated manifest: ``frame`` has the canonical columns, absolute image paths and the
    ``line`` each row came from (so later errors can still point into the user's file)."""

    frame: pd.DataFrame
    source: Path
    skipped: tuple[BadRow, ...] = field(default=())

    def rows(self, *splits: Split) -> pd.DataFrame:
        return self.frame[self.frame["split"].isin([str(s) for s in splits])].reset_index(drop=True)


def _read_table(path: Path, sep: str | None) -> pd.DataFrame:
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file not found")
    if sep is None:
        sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not a readable {'TSV' if sep == chr(9) else 'CSV'} file: {exc}") from exc


def _check_image(path: Path) -> tuple[str, str] | None:
    """(kind, problem) of an image file that cannot be used, else None."""
    if path.is_dir():
        return "a directory, not an image", f"image path is a directory, not an image file: {path}"
    if not path.is_file():
        return "image file not found", f"image file not found: {path}"
    try:
        with Image.open(path) as img:
            img.verify()
    except (UnidentifiedImageError, OSError) as exc:
        return "unreadable image", f"image file cannot be read as an image: {path} ({exc})"
    return None


def _outside(root: Path, image: str) -> bool:
    return not (root / image).resolve().is_relative_to(root.resolve())


def _row_problems(
    frame: pd.DataFrame, root: Path, columns: ManifestColumns, verify_images: bool, allow_outside_paths: bool
) -> list[BadRow]:
    problems: list[BadRow] = []
    seen_paths: dict[str, int] = {}
    valid_splits = {str(s) for s in Split}
    for i, row in enumerate(frame.itertuples(index=False)):
        line = i + 2
        image = row.filepath.strip()
        if not image:
            problems.append(BadRow(line, columns.image, "empty image path", "empty image path"))
        elif not allow_outside_paths and _outside(root, image):
            problems.append(
                BadRow(
                    line,
                    columns.image,
                    f"image path {image!r} is outside the manifest's folder "
                    f"{root} (absolute paths and '..' need allow_outside_paths=True)",
                    "image path outside the manifest's folder",
                )
            )
        elif image in seen_paths:
            problems.append(
                BadRow(
                    line,
                    columns.image,
                    f"duplicate image {image!r} (first on line {seen_paths[image]})",
                    f"duplicate image (first on line {seen_paths[image]})",
                )
            )
        else:
            seen_paths[image] = line
            found = _check_image(root / image) if verify_images else None
            if found:
                problems.append(BadRow(line, columns.image, found[1], found[0]))
        if not row.title.strip():
            problems.append(BadRow(line, columns.caption, "empty caption", "empty caption"))
        if not row.patient_id.strip():
            problems.append(BadRow(line, columns.patient, "empty patient id", "empty patient id"))
        if row.split not in valid_splits:
            problems.append(
                BadRow(
                    line,
                    columns.split or "split",
                    f"unknown split {row.split!r}; expected one of {sorted(valid_splits)}",
                    f"unknown split; expected one of {sorted(valid_splits)}",
                )
            )
        mask = getattr(row, "mask", "").strip()
        if mask and not allow_outside_paths and _outside(root, mask):
            problems.append(
                BadRow(
                    line,
                    "mask",
                    f"mask path {mask!r} is outside the manifest's folder {root}",
                    "mask path outside the manifest's folder",
                )
            )
        elif mask and verify_images and (found := _check_image(root / mask)):
            problems.append(BadRow(line, "mask", found[1], found[0]))
    return problems


def _check_patients(frame: pd.DataFrame, source: Path, columns: ManifestColumns) -> None:
    """A patient has one name, one site and one population; anything else is an error."""
    checks = (
        ("name", columns.name, "names"),
        ("site", columns.site, "sites"),
        ("population", columns.split, "populations (public / member / held-out)"),
    )
    for canon, user, what in checks:
        per_patient = frame.groupby("patient_id")[canon].nunique()
        bad = per_patient[per_patient > 1]
        if len(bad):
            pid = bad.index[0]
            lines = frame.loc[frame["patient_id"] == pid, "line"].tolist()
            values = sorted(frame.loc[frame["patient_id"] == pid, canon].unique())
            raise ManifestError(
                f"{source}: column '{user}': patient {pid!r} has several {what} {values} "
                f"(lines {lines[:10]}); a patient must belong to exactly one"
                + (f" ({len(bad)} patients affected)" if len(bad) > 1 else ""),
                rows=tuple((int(line), str(user), f"a patient with several {what}") for line in lines),
            )


def load_manifest(
    path: str | Path,
    *,
    columns: ManifestColumns = ManifestColumns(),
    sep: str | None = None,
    skip_bad_rows: bool = False,
    verify_images: bool = True,
    allow_outside_paths: bool = False,
) -> Manifest:
    """Read, validate and canonicalise a manifest.

    ``skip_bad_rows`` skips rows with row-level problems (missing or unreadable image, empty
    caption or id, unknown split, duplicate image) and lists them; conflicts between rows of one
    patient (two names, two sites) always raise, since no row can be chosen over another. Image
    paths must stay inside the manifest's folder unless ``allow_outside_paths`` (a manifest that
    reaches elsewhere on a site's disk should be a deliberate choice).
    """
    source = Path(path).resolve()
    raw = _read_table(source, sep)
    mapping = columns.mapping()
    missing = [user for user in mapping if user not in raw.columns]
    if missing:
        raise ManifestError(f"{source}: missing column(s) {missing}; the file has columns {list(raw.columns)}")
    if raw.empty:
        raise ManifestError(f"{source}: the manifest has a header but no rows")
    frame = raw[list(mapping)].rename(columns=mapping)
    if "name" not in frame:
        frame["name"] = frame["patient_id"]
    for canon, default in (("site", ""), ("condition", ""), ("split", str(Split.TRAIN))):
        if canon not in frame:
            frame[canon] = default
    frame = frame[list(MANIFEST_COLUMNS)].copy()
    if MASK_COLUMN in raw.columns:  # optional: per row, an image of the region to privatize (MaskDP)
        frame[MASK_COLUMN] = raw[MASK_COLUMN].str.strip()
    frame["line"] = range(2, len(frame) + 2)

    problems = _row_problems(frame, source.parent, columns, verify_images, allow_outside_paths)
    if problems and not skip_bad_rows:
        shown = "\n  ".join(p.describe(source) for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ManifestError(
            f"{len(problems)} bad row(s) in {source}:\n  {shown}{more}",
            rows=tuple((p.line, p.column, p.kind) for p in problems),
        )
    bad_lines = {p.line for p in problems}
    frame = frame[~frame["line"].isin(bad_lines)].reset_index(drop=True)
    if frame.empty:
        raise ManifestError(f"{source}: every row was bad; nothing left to load")
    frame["population"] = frame["split"].map(lambda s: _POPULATION[Split(s)])
    _check_patients(frame, source, columns)
    frame = frame.drop(columns="population")
    frame["filepath"] = [str(source.parent / p) for p in frame["filepath"]]
    if MASK_COLUMN in frame:
        frame[MASK_COLUMN] = [str(source.parent / p) if p else "" for p in frame[MASK_COLUMN]]
    return Manifest(frame=frame, source=source, skipped=tuple(problems))
