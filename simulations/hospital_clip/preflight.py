"""Checks that need the data's shape: done once before Ray starts, and again by the ServerApp.

The sites and their sizes come from the manifest, or from the synthetic generator's plan (the
same draws ``generate`` will make). With them: every site named in ``site-budgets`` must exist,
with a manifest, ``declared-units`` must be set (the public divisor of the DP sum), and delta
must not exceed 1/(units at the smallest site): a mechanism that publishes one random
unit's data outright is (0, 1/n)-DP, so a larger delta makes every epsilon meaningless. Only an
explicit ``allow-large-delta = true`` runs it anyway, and the summary says so.

In a deployment (``sites`` declared) the sites and their public sizes are declared, and the
server's manifest may hold public and held-out rows only: a server that holds member rows is not
the deployment the consortium agreed to, so it is refused rather than used.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedclip.data.manifest import load_manifest
from fedclip.data.schema import Split
from fedclip.data.synthetic import site_sizes
from simulations.hospital_clip.config import SimulationConfig
from simulations.hospital_clip.task import POOLED_SITE, site_frames


@dataclass(frozen=True)
class DataShape:
    units: dict[str, int]  # privacy units per site

    @property
    def sites(self) -> list[str]:
        return sorted(self.units)


def data_shape(cfg: SimulationConfig, manifest: str | None = None) -> DataShape:
    """Sites and their unit counts, from ``manifest`` (or ``cfg.manifest``) or the synthetic plan."""
    manifest = manifest or cfg.manifest
    if cfg.deployment:
        return DataShape({site: cfg.declared_units for site in cfg.declared_sites()})
    if manifest:
        parts = site_frames(manifest, cfg.num_sites, cfg.seed, cfg.pool_sites, cfg.allow_outside_paths)
        units = {}
        for site, frame in parts.items():
            rows = frame[frame["split"] == str(Split.TRAIN)]
            units[site] = rows["patient_id"].nunique() if cfg.privacy_unit == "identity" else len(rows)
        return DataShape(units)
    sizes = site_sizes(cfg.synthetic())
    per = 1 if cfg.privacy_unit == "identity" else cfg.images_per_patient
    if cfg.pool_sites:
        return DataShape({POOLED_SITE: sum(sizes) * per})
    return DataShape({f"hospital_{i}": n * per for i, n in enumerate(sizes)})


def preflight(cfg: SimulationConfig, manifest: str | None = None) -> DataShape:
    if cfg.manifest and not cfg.declared_units and cfg.dp_mode in ("microbatch", "unit"):
        raise ValueError(
            "declared-units: with a manifest, declare the public number of units per site (the DP sum "
            "is divided by it; dividing by the data's own count would reveal it)"
        )
    if cfg.deployment:
        server_holds_no_members(manifest or cfg.manifest, outside_paths=cfg.allow_outside_paths)
    shape = data_shape(cfg, manifest)
    unknown = sorted(set(cfg.site_budget_map()) - set(shape.units))
    if unknown:
        raise ValueError(f"site-budgets: no site named {unknown}; the data's sites are {shape.sites}")
    smallest = min(shape.units.values())
    if smallest == 0:  # a non-private deployment that declares no sizes: there is no epsilon to protect
        return shape
    if cfg.delta > 1 / smallest and not cfg.allow_large_delta:
        site = min(shape.units, key=shape.units.get)
        raise ValueError(
            f"delta: {cfg.delta:g} is above 1/(number of {cfg.privacy_unit} units at the smallest site, "
            f"{site}) = 1/{smallest}; at such a delta a mechanism may publish a unit's data outright, so "
            "epsilon would mean nothing. Choose delta << 1/n, or set allow-large-delta=true to run anyway "
            "(the summary will say so)"
        )
    return shape


def server_holds_no_members(manifest: str, *, outside_paths: bool = False) -> None:
    frame = load_manifest(manifest, allow_outside_paths=outside_paths).frame
    members = frame[frame["split"].isin([str(Split.TRAIN), str(Split.QUERY)])]
    if len(members):
        raise ValueError(
            f"manifest: {manifest} holds {len(members)} member rows (split 'train' or 'query', first on "
            f"line {int(members['line'].iloc[0])}); in a deployment the server keeps public and heldout rows "
            "only: the hospitals hold their members, the auditor holds the attack's targets"
        )
