"""Names shared by the generator, the loader and the evaluation: splits, columns, conditions."""

from __future__ import annotations

from enum import StrEnum

CONDITIONS: tuple[str, ...] = (
    "no acute findings",
    "pneumonia",
    "pleural effusion",
    "cardiomegaly",
    "pulmonary nodule",
)

MANIFEST_COLUMNS: tuple[str, ...] = ("filepath", "title", "patient_id", "name", "site", "condition", "split")
MASK_COLUMN = "mask"  # optional: an image per row, white where the row's image is sensitive (MaskDP)


class Split(StrEnum):
    """What an image is for. Populations are disjoint: a patient's images are all public, all
    member (train + query) or all held-out."""

    PUBLIC = "public"  # warm-start pretraining population
    TRAIN = "train"  # a site's member training images
    QUERY = "query"  # extra images of members, never trained on (IDIA member queries)
    HELDOUT = "heldout"  # held-out patients: IDIA non-members and the utility test set
