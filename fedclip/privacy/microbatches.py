"""Fixed, data-independent assignment of privacy units to micro-batches.

The sensitivity argument (``fedclip.privacy.events``) needs adding or removing one unit to
change exactly one micro-batch and leave every other micro-batch as it was. A keyed hash of the
unit id gives that: a unit's micro-batch depends only on its own id and the key, never on which
other units exist, so it is the same in neighbouring data sets and in every round. Shuffling the
sampled set instead would move every other record when one unit is added.

**The key is public** (a site's is ``fedclip:<site name>``) and need not be secret. The
argument above uses only that the assignment is a fixed function of the unit id, chosen before
the data: whoever knows the key knows which micro-batch each unit id would go to, but the
accounting already takes the worst case over every micro-batch's content (any clipped term a
replaced by any b, both of norm <= C), so knowing the slot gives an adversary nothing the bound
did not grant it. The key only spreads units evenly; the noise and the Poisson sampling of
micro-batches, which come from the OS at every site, are what must stay secret.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

import numpy as np

from fedclip.privacy.events import PrivacyUnit


def unit_ids(*, privacy_unit: PrivacyUnit, patient_ids: Sequence[str], record_ids: Sequence[str]) -> list[str]:
    """The unit each record belongs to: its patient (identity) or itself (record)."""
    ids = patient_ids if PrivacyUnit(privacy_unit) == PrivacyUnit.IDENTITY else record_ids
    return list(ids)


def block_of(units: Sequence[str], *, num_blocks: int, key: str) -> np.ndarray:
    """Micro-batch index in [0, num_blocks) of each unit: HMAC-SHA256(key, unit id) mod B."""
    if num_blocks < 1:
        raise ValueError(f"num_blocks: expected an integer >= 1, got {num_blocks}")
    k = key.encode()
    return np.array(
        [int.from_bytes(hmac.new(k, u.encode(), hashlib.sha256).digest()[:8], "big") % num_blocks for u in units],
        dtype=np.int64,
    )


def group_records(units: Sequence[str], *, num_blocks: int, key: str) -> list[np.ndarray]:
    """Record indices of each micro-batch (some may be empty)."""
    blocks = block_of(units, num_blocks=num_blocks, key=key)
    return [np.flatnonzero(blocks == b) for b in range(num_blocks)]
