"""Split a manifest's members into sites: by its site column, or across N sites by patient.

A patient never spans two sites: under identity-level privacy the site that holds a patient
accounts for all of that patient's pairs, which only works if no other site holds any of them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedclip.data.schema import Split

MEMBER_SPLITS = (str(Split.TRAIN), str(Split.QUERY))


def members(frame: pd.DataFrame) -> pd.DataFrame:
    """The member rows (training and query images of the sites' patients)."""
    return frame[frame["split"].isin(MEMBER_SPLITS)]


def assign_sites_by_patient(frame: pd.DataFrame, *, num_sites: int, seed: int) -> pd.DataFrame:
    """Deal the member patients, shuffled by ``seed``, round-robin over ``num_sites`` sites.

    Returns a copy whose ``site`` column is ``site_0`` ... for members and empty for others.
    """
    if num_sites < 1:
        raise ValueError(f"num_sites: expected an integer >= 1, got {num_sites}")
    patients = sorted(members(frame)["patient_id"].unique())
    if len(patients) < num_sites:
        raise ValueError(f"num_sites: {num_sites} sites but only {len(patients)} member patients to split")
    order = np.random.default_rng(seed).permutation(len(patients))
    site_of = {patients[j]: f"site_{k % num_sites}" for k, j in enumerate(order)}
    out = frame.copy()
    out["site"] = [site_of.get(p, "") if s in MEMBER_SPLITS else "" for p, s in zip(out["patient_id"], out["split"])]
    return out


def partition_by_site(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Member rows grouped by the ``site`` column, sites in sorted order."""
    rows = members(frame)
    unnamed = rows[rows["site"].str.strip() == ""]
    if len(unnamed):
        lines = unnamed["line"].tolist()[:10] if "line" in unnamed else []
        raise ValueError(
            f"site: {len(unnamed)} member row(s) have no site (lines {lines}); "
            "give every training row a site, or split by patient with assign_sites_by_patient"
        )
    return {site: part.reset_index(drop=True) for site, part in sorted(rows.groupby("site"), key=lambda kv: kv[0])}
