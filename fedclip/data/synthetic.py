"""A deterministic synthetic multi-hospital image-report data set.

Real patient data cannot ship, so this generator builds data that has the two properties the
platform studies:

* **utility**: every image shows one finding from a small set of conditions, drawn as a
  luminance structure (a hazy patch, a bright band, an enlarged dark ellipse, a dot, or
  nothing), so zero-shot condition classification is learnable;
* **identity**: every patient has a stable, patient-specific colour pattern that appears in all
  of their images, and every report names the patient, so a model trained on a patient's pairs
  can link *new* images of that patient to the name. That is exactly what the identity inference
  attack (IDIA) probes.

Populations are disjoint: a *public* population (warm-start pretraining), the *sites'* patients
(federation members, with extra query images that are never trained on) and *held-out* patients
(IDIA non-members and the utility test set). The output is image files plus a CSV manifest in
open_clip's CSV convention (``filepath`` and ``title`` columns) with patient id, name, site,
condition and split, so a user's own data in the same form drops in.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fedclip.data.names import DEFAULT_NAME_LISTS, check_name_lists, draw_unique_names
from fedclip.data.schema import CONDITIONS, MANIFEST_COLUMNS, MASK_COLUMN, Split

FINDING_PHRASES: dict[str, tuple[str, ...]] = {
    "no acute findings": ("no acute findings", "no acute findings seen", "normal study, no acute findings"),
    "pneumonia": ("pneumonia", "consolidation consistent with pneumonia", "signs of pneumonia"),
    "pleural effusion": ("pleural effusion", "a small pleural effusion", "pleural effusion at the base"),
    "cardiomegaly": ("cardiomegaly", "an enlarged heart, cardiomegaly", "cardiomegaly is present"),
    "pulmonary nodule": ("pulmonary nodule", "a small pulmonary nodule", "a solitary pulmonary nodule"),
}

REPORT_TEMPLATES: tuple[str, ...] = (
    "Chest X-ray of {name}: {finding}.",
    "{name}, chest radiograph. Findings: {finding}.",
    "Report for {name}. Impression: {finding}.",
    "Patient {name} imaged today; {finding}.",
    "Radiograph of {name} shows {finding}.",
)


@dataclass(frozen=True)
class SyntheticConfig:
    """Size and shape of the generated data set; every field is validated on construction."""

    seed: int = 0
    num_sites: int = 4
    # hospitals of hundreds of patients: identity-level DP adds noise that does not shrink with a
    # site's size while the clipped signal grows with it, so tens of patients learn nothing
    patients_per_site: int = 250
    public_patients: int = 500
    heldout_patients: int = 250
    images_per_patient: int = 10
    query_images_per_patient: int = 5
    image_size: int = 32
    site_skew: float = 0.0
    noise: float = 0.06
    # how strongly a patient's look marks their images against the finding and the noise; 1.5 (1.0
    # until 2026-12-02): with 1.0 the federated non-private model's replies named a third of the
    # members, with 1.5 half (docs/results.md, "The attack's signal"): faces are easy to tell apart
    identity_strength: float = 1.5
    identity_grid: int = 3
    # "short" | "census": which name lists patients are named from (fedclip.data.names says why it matters)
    name_lists: str = DEFAULT_NAME_LISTS
    # canary patients for the one-run audit (fedclip.data.canaries): each trains at a site with
    # probability 1/2, decided by a secret from the OS that only the auditor's file records
    canaries: int = 0
    # side of the identity-bearing patch as a share of the image's side: 1 = the whole image (the
    # default look); below 1 each patient's look fills a square patch at a place of their own, the
    # rest is a neutral background, and every image gets a mask of the patch (manifest column
    # ``mask``) for region-level privatization (MaskDP, fedclip.privatize.maskdp)
    identity_region: float = 1.0

    def __post_init__(self) -> None:
        positive = ("num_sites", "patients_per_site", "images_per_patient", "query_images_per_patient")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        for name in ("public_patients", "heldout_patients", "canaries"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected an integer >= 0, got {getattr(self, name)}")
        if self.image_size < 16:
            raise ValueError(f"image_size: expected >= 16 pixels, got {self.image_size}")
        if self.site_skew < 0:
            raise ValueError(
                f"site_skew: expected 0 (balanced sites) or a Dirichlet concentration > 0, got {self.site_skew}"
            )
        if not 0 < self.identity_strength <= 2:
            raise ValueError(f"identity_strength: expected a weight in (0, 2], got {self.identity_strength}")
        if not 2 <= self.identity_grid <= self.image_size // 2:
            raise ValueError(f"identity_grid: expected 2 .. image_size/2 cells per side, got {self.identity_grid}")
        check_name_lists(self.name_lists)
        if not 0.25 <= self.identity_region <= 1:
            raise ValueError(
                f"identity_region: expected a share of the image's side in [0.25, 1], got {self.identity_region}"
            )
        if not 0 <= self.noise < 1:
            raise ValueError(f"noise: expected a pixel noise level in [0, 1), got {self.noise}")


def _site_plan(cfg: SyntheticConfig, rng: np.random.Generator) -> tuple[list[int], np.ndarray]:
    """Patients per site and each site's condition mix.

    ``site_skew`` = 0 means balanced sites with uniform condition mixes; a positive value is the
    concentration of a Dirichlet over sites (sizes) and over conditions (mix): small is skewed.
    """
    total = cfg.num_sites * cfg.patients_per_site
    k = len(CONDITIONS)
    if cfg.site_skew == 0:
        return [cfg.patients_per_site] * cfg.num_sites, np.full((cfg.num_sites, k), 1.0 / k)
    shares = rng.dirichlet(np.full(cfg.num_sites, cfg.site_skew))
    # Every site keeps at least two patients; the rest is shared in proportion to the Dirichlet draw.
    spare = total - 2 * cfg.num_sites
    if spare < 0:
        raise ValueError("patients_per_site: skewed sites need at least 2 patients per site")
    sizes = 2 + np.floor(shares * spare).astype(int)
    sizes[np.argmax(shares)] += total - sizes.sum()
    mixes = rng.dirichlet(np.full(k, cfg.site_skew), size=cfg.num_sites)
    return sizes.tolist(), mixes


def _identity_pattern(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A patient's stable look: a smooth colour field upsampled from a cells x cells grid."""
    grid = rng.uniform(0.1, 0.9, size=(cells, cells, 3)).astype(np.float32)
    img = Image.fromarray((grid * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def _finding_overlay(condition: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A luminance map (added to every channel) that draws one condition."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if condition == "no acute findings":
        return np.zeros((size, size), np.float32)
    if condition == "pneumonia":
        cx = rng.choice([0.28, 0.72]) + rng.normal(0, 0.03)
        cy = 0.45 + rng.normal(0, 0.05)
        return 0.55 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 0.11**2))
    if condition == "pleural effusion":
        level = 0.72 + rng.normal(0, 0.03)
        meniscus = level - 0.12 * (xx - 0.5) ** 2
        return 0.55 * (yy > meniscus).astype(np.float32)
    if condition == "cardiomegaly":
        cx, cy = 0.5 + rng.normal(0, 0.02), 0.55 + rng.normal(0, 0.02)
        inside = ((xx - cx) / 0.30) ** 2 + ((yy - cy) / 0.22) ** 2 <= 1
        return -0.5 * inside.astype(np.float32)
    if condition == "pulmonary nodule":
        cx, cy = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.7)
        return 0.8 * (((xx - cx) ** 2 + (yy - cy) ** 2) <= 0.07**2).astype(np.float32)
    raise ValueError(f"condition: unknown condition {condition!r}; expected one of {CONDITIONS}")


NEUTRAL = 0.5  # the background outside an identity patch: the same for everyone


def _identity_patch(rng: np.random.Generator, size: int, share: float) -> np.ndarray:
    """Where a patient's look lives: a square of side ``share * size`` at a place of their own."""
    side = max(4, int(round(share * size)))
    top, left = rng.integers(0, size - side + 1, size=2)
    patch = np.zeros((size, size), dtype=bool)
    patch[top : top + side, left : left + side] = True
    return patch


def render_image(
    pattern: np.ndarray,
    condition: str,
    rng: np.random.Generator,
    *,
    noise: float,
    identity_strength: float,
    patch: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One image of one patient: identity pattern, shifted and lit a little differently each time;
    with a ``patch``, the pattern only inside it, and the patch (shifted alike) as the image's mask."""
    size = pattern.shape[0]
    shift = rng.integers(-2, 3, size=2)
    look = pattern if patch is None else np.where(patch[..., None], pattern, NEUTRAL)
    base = np.roll(look, tuple(shift), axis=(0, 1)) * rng.uniform(0.85, 1.15)
    mask = None if patch is None else np.roll(patch, tuple(shift), axis=(0, 1))
    # the strength weighs the patient's look, not the neutral background around a patch
    weighted = identity_strength * base if mask is None else np.where(mask[..., None], identity_strength * base, base)
    img = weighted + _finding_overlay(condition, rng, size)[..., None]
    img = img + rng.normal(0, noise, size=img.shape)
    return np.clip(img, 0.0, 1.0), mask


def caption(name: str, condition: str, rng: np.random.Generator) -> str:
    """One report in the synthetic data's wording (also the benchmarks' caption lengths)."""
    template = REPORT_TEMPLATES[rng.integers(len(REPORT_TEMPLATES))]
    phrases = FINDING_PHRASES[condition]
    return template.format(name=name, finding=phrases[rng.integers(len(phrases))])


def _columns(config: SyntheticConfig) -> list[str]:
    return list(MANIFEST_COLUMNS) + ([MASK_COLUMN] if config.identity_region < 1 else [])


def site_sizes(config: SyntheticConfig) -> list[int]:
    """Patients per site that ``generate`` will make (the same first draws of the same stream)."""
    return _site_plan(config, np.random.default_rng(config.seed))[0]


def _patient(
    out: Path,
    pid: str,
    name: str,
    site: str,
    mix: np.ndarray,
    splits: list,
    rng: np.random.Generator,
    config: SyntheticConfig,
) -> list[dict[str, str]]:
    """One patient's images (written under ``out/images``) and manifest rows."""
    pattern = _identity_pattern(rng, config.image_size, config.identity_grid)
    patch = _identity_patch(rng, config.image_size, config.identity_region) if config.identity_region < 1 else None
    rows = []
    for k, image_split in enumerate(splits):
        condition = CONDITIONS[rng.choice(len(CONDITIONS), p=mix)]
        pixels, mask = render_image(
            pattern, condition, rng, noise=config.noise, identity_strength=config.identity_strength, patch=patch
        )
        rel = f"images/{pid}_{k:02d}.png"
        Image.fromarray((pixels * 255).round().astype(np.uint8)).save(out / rel, optimize=False)
        rows.append(
            {
                "filepath": rel,
                "title": caption(name, condition, rng),
                "patient_id": pid,
                "name": name,
                "site": site,
                "condition": condition,
                "split": str(image_split),
            }
        )
        if mask is not None:
            rows[-1][MASK_COLUMN] = f"images/{pid}_{k:02d}_mask.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / rows[-1][MASK_COLUMN], optimize=False)
    return rows


def canary_patients(
    out: Path, *, count: int, sites: list[str], config: SyntheticConfig, exclude_names: set[str], secret: bytes | None
) -> pd.DataFrame:
    """Make ``count`` canary patients like members (training and query images under ``out/images``,
    each at a random site of ``sites``), from their own stream so other patients stay as they are;
    write every canary's rows and its inclusion to the auditor's ``canaries.csv`` (and the secret
    beside it) and return them. Inclusion comes from ``secret`` (default: 32 bytes from the OS)."""
    from fedclip.data.canaries import CANARY_FILE, draw_inclusion

    if not sites:
        raise ValueError("canaries: no site to place canaries at")
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([config.seed, 0xCA7A])
    names = draw_unique_names(rng, count, exclude=exclude_names, lists=config.name_lists)
    uniform = np.full(len(CONDITIONS), 1.0 / len(CONDITIONS))
    splits = [Split.TRAIN] * config.images_per_patient + [Split.QUERY] * config.query_images_per_patient
    rows: list[dict[str, str]] = []
    for c, name in enumerate(names):
        rows += _patient(out, f"C{c:05d}", name, sites[rng.integers(len(sites))], uniform, splits, rng, config)
    canaries = pd.DataFrame(rows, columns=_columns(config))
    secret = os.urandom(32) if secret is None else secret
    included = dict(zip(sorted(set(canaries["patient_id"])), draw_inclusion(count, secret=secret)))
    canaries["included"] = canaries["patient_id"].map(included).astype(int)
    canaries.to_csv(out / CANARY_FILE, index=False)
    (out / (CANARY_FILE + ".secret")).write_text(secret.hex() + "\n")
    return canaries


def _with_canaries(out: Path, frame: pd.DataFrame, config: SyntheticConfig, *, secret: bytes | None) -> pd.DataFrame:
    """The manifest with the included canaries' training rows (``canary_patients`` at this data's sites)."""
    canaries = canary_patients(
        out,
        count=config.canaries,
        config=config,
        exclude_names=set(frame["name"]),
        secret=secret,
        sites=sorted(set(frame.loc[frame["split"] == str(Split.TRAIN), "site"])),
    )
    trained = canaries[(canaries["included"] == 1) & (canaries["split"] == str(Split.TRAIN))]
    return pd.concat([frame, trained[_columns(config)]], ignore_index=True)


def generate(
    out_dir: str | Path, config: SyntheticConfig = SyntheticConfig(), *, canary_secret: bytes | None = None
) -> Path:
    """Write images and ``manifest.csv`` under ``out_dir``; return the manifest's path.

    The same config gives byte-identical files: every random draw comes from one seeded stream;
    except which canaries train (``config.canaries``), decided by ``canary_secret`` (default: the
    OS), because a one-run audit is valid only if inclusion is random and unknown to training.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    sizes, mixes = _site_plan(config, rng)
    n_members = sum(sizes)
    names = draw_unique_names(
        rng, config.public_patients + n_members + config.heldout_patients, lists=config.name_lists
    )
    uniform = np.full(len(CONDITIONS), 1.0 / len(CONDITIONS))

    # (population split of the training images, site, condition mix, number of query images)
    plan: list[tuple[str, str, np.ndarray, int]] = []
    plan += [(Split.PUBLIC, "", uniform, 0)] * config.public_patients
    for s, n in enumerate(sizes):
        plan += [(Split.TRAIN, f"hospital_{s}", mixes[s], config.query_images_per_patient)] * n
    plan += [(Split.HELDOUT, "", uniform, 0)] * config.heldout_patients

    rows: list[dict[str, str]] = []
    for idx, ((split, site, mix, n_query), name) in enumerate(zip(plan, names)):
        n_main = config.query_images_per_patient if split == Split.HELDOUT else config.images_per_patient
        rows += _patient(out, f"P{idx:05d}", name, site, mix, [split] * n_main + [Split.QUERY] * n_query, rng, config)
    frame = pd.DataFrame(rows, columns=_columns(config))
    if config.canaries:
        frame = _with_canaries(out, frame, config, secret=canary_secret)
    manifest = out / "manifest.csv"
    frame.to_csv(manifest, index=False)
    (out / "synthetic_config.json").write_text(json.dumps(asdict(config), indent=2, sort_keys=True))
    return manifest
