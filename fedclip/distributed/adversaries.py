"""Who sees which noise: one Skellam variance per adversary, from the shares really in a sum.

A round's sum carries the shares of the sites whose masked vectors it contains (SecAgg+
recovers a site that dropped after sending; one that dropped before is not in it). Three
adversaries, each with the noise it cannot subtract:

* ``server``: the server alone sees the sum, so every share in it protects.
* ``colluding``: the server plus up to ``colluders`` sites, who know their own shares and
  subtract them. The worst case for a patient at site k removes the largest ``colluders`` shares
  among the other sites (a site does not collude against its own patients: it has their data).
* ``own-share``: a site trusts nobody; its patients keep only its own share. Worst site.

Secure aggregation itself trusts that fewer than the reconstruction threshold of sites collude
with the server (else masks can be removed and a single vector seen): ``colluding`` only means
something for colluders below that threshold, and a plan that claims more is refused
(``check_colluders``).
A variance of 0 is an infinite epsilon.
"""

from __future__ import annotations

from collections.abc import Mapping

ADVERSARIES: tuple[str, ...] = ("server", "colluding", "own-share")


def adversary_variances(shares: Mapping[str, float], *, colluders: int) -> dict[str, float]:
    """The variance each adversary faces in one sum; ``shares``: site -> its Skellam variance in it."""
    if colluders < 0:
        raise ValueError(f"colluders: expected an integer >= 0, got {colluders}")
    if not shares:
        raise ValueError("shares: a sum with no site's share in it releases nothing; nothing to account")
    if any(v < 0 for v in shares.values()):
        raise ValueError(f"shares: variances must be >= 0, got {dict(shares)}")
    total = sum(shares.values())
    worst_colluding = total
    for site in shares:
        others = sorted((v for s, v in shares.items() if s != site), reverse=True)
        worst_colluding = min(worst_colluding, total - sum(others[:colluders]))
    return {"server": total, "colluding": worst_colluding, "own-share": min(shares.values())}


def planned_share(target_variance: float, *, min_survivors: int) -> float:
    """Each site's share, so that any ``min_survivors`` shares (the reconstruction threshold: fewer
    fail the round) carry at least ``target_variance`` together."""
    if min_survivors < 1:
        raise ValueError(f"min_survivors: expected an integer >= 1, got {min_survivors}")
    if not target_variance > 0:
        raise ValueError(f"target_variance: expected a value > 0, got {target_variance}")
    return target_variance / min_survivors


def check_colluders(colluders: int, *, threshold: int) -> None:
    """SecAgg hides single vectors from the server with fewer than ``threshold`` colluding sites
    (Bonawitz et al. 2017, honest-but-curious; Flower's server also picks the SecAgg+ neighbour
    graph, so the apps share keys among all sites): a plan that claims more is refused."""
    if not 0 <= colluders < threshold:
        raise ValueError(
            f"secure-agg-colluders: expected an integer in [0, {threshold - 1}] (fewer than the reconstruction "
            f"threshold {threshold}), got {colluders}"
        )
