"""What an epsilon is about: the neighbouring data sets, and what the guarantee covers.

An epsilon means nothing without its relation. The relation of the *data sets* (what an adversary
cannot tell apart) is not the relation the accountant uses between *mechanism outputs*
(``DpEvent.relation``), and the two are easy to mix up:

- one clipped term per unit (``microbatch`` with one unit per micro-batch, ``unit``, ``paper``):
  data sets that differ by **adding or removing one unit**; the accountant's add-or-remove.
  Replacing a unit's data is not covered at this epsilon (it is two such changes).
- several units per micro-batch (keyed-hash micro-batches): adding or removing one unit
  *replaces* its micro-batch's clipped term, accounted as replace-one; the data sets still differ
  by **adding or removing one unit** (or changing that unit's data, which replaces the same term).
- input-level privatization (CADP, MaskDP): **one unit's images replaced by as many other
  images**; the reports, the number of images and whether the unit is in the data at all are not
  covered, so a membership audit does not test this epsilon (``membership`` False).
- client-level DP at the server: one site's clipped update **zeroed out** (the number of sites
  fixed); see ``strategies.client_level``.

Every table row with an epsilon carries ``neighbours`` and ``covers`` from here.
"""

from __future__ import annotations

from dataclasses import dataclass

NOUN = {"identity": "patient", "record": "image-report pair"}
GROUP_NOTE = {"identity": "", "record": " (a patient with k pairs only through group privacy, about k x epsilon)"}


@dataclass(frozen=True)
class Guarantee:
    neighbours: str  # the data sets the epsilon cannot tell apart
    covers: str  # what of the unit's data the epsilon protects
    membership: bool  # does it bound a test of whether the unit is in the data (the attacks' question)?

    def as_columns(self) -> dict[str, str]:
        return {"neighbours": self.neighbours, "covers": self.covers}


def guarantee_of(*, mode: str, privacy_unit: str, microbatch_size: int = 1) -> Guarantee:
    """The guarantee of a site's epsilon in ``mode`` (a training mode or an input privatization)."""
    noun, group = NOUN[str(privacy_unit)], GROUP_NOTE[str(privacy_unit)]
    if mode == "nonprivate":
        return Guarantee("none: non-private, epsilon infinite", "nothing", membership=True)
    if mode == "mask-replace":
        return Guarantee("none: mask-replace claims no epsilon", "nothing", membership=False)
    if mode in ("cadp", "maskdp"):
        where = "inside each image's mask only" if mode == "maskdp" else "images only"
        return Guarantee(
            f"replace one {noun}'s images by as many other images (local, replace-one){group}",
            f"{where}: not the reports, the number of images, or membership",
            membership=False,
        )
    if mode == "distributed":
        return Guarantee(
            f"add or remove one {noun} anywhere in the federation (one clipped term of one DP-SGD step over all "
            f"sites, Skellam noise summed by secure aggregation; per adversary: distributed.json){group}",
            f"the {noun}'s image-report pairs, in every step's sum",
            membership=True,
        )
    if mode not in ("microbatch", "unit", "paper"):
        raise ValueError(f"dp-mode: no guarantee is defined for {mode!r}")
    how = (
        "one fixed micro-batch's clipped term replaced: replace-one accounting"
        if mode == "microbatch" and microbatch_size > 1
        else "one clipped term added or removed: add-or-remove accounting"
    )
    return Guarantee(
        f"add or remove one {noun} ({how}){group}",
        f"the {noun}'s image-report pairs, in every update and released statistic",
        membership=True,
    )


SITE_LEVEL = Guarantee(
    "zero out one site's clipped update, the number of sites fixed (client-level)",
    "a whole site's update",
    membership=True,
)
