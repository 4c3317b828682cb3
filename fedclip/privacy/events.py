"""Immutable, serialisable privacy events: what one stretch of local training spent.

A site's training returns one event per round; the server composes them in a ledger
(``fedclip.privacy.ledger``). Events carry everything an accountant needs and nothing about the
data, so a site can ship one to the server.

**Neighbouring relation of the guarantee.** Every epsilon fedclip prints is for two data sets
that differ by *adding or removing one privacy unit* (one image-text pair for ``record``, all
pairs of one patient for ``identity``). ``relation`` below is something else: the relation
between the two *mechanism outputs* that this change induces, which decides the accountant.

* ``add_or_remove`` with sensitivity 1 (``unit`` mode, and ``microbatch`` mode with one unit
  per micro-batch): every unit is its own clipped term, Poisson-sampled with rate q; adding or
  removing the unit adds or removes that term (norm <= C). The standard subsampled Gaussian:
  Opacus' accountants apply. In ``unit`` mode the unit's loss is contrasted against public
  negatives only, so its gradient depends on no other unit's data.
* ``replace_one`` (per-micro-batch mode with several units per micro-batch): units are assigned
  to fixed micro-batches by a keyed hash, and micro-batches are Poisson-sampled with rate q. Adding or removing one unit changes
  the content of exactly one micro-batch, so in the noisy sum one clipped term a (norm <= C) is
  replaced by another b (norm <= C), present with probability q in both worlds: the outputs are
  (1-q) N(0, s^2) + q N(a, s^2) against (1-q) N(0, s^2) + q N(b, s^2), s = sigma C. The worst
  case is a = -b at norm C, which is dp-accounting's ``REPLACE_ONE`` Gaussian with sensitivity C.
  ``sensitivity`` = 1 (in units of C).
* ``add_or_remove`` (paper mode: the whole Poisson-sampled batch is one clipped micro-batch):
  the micro-batch is always present, and adding the unit (with probability q) moves its clipped
  gradient from g(S) to g(S + unit), by at most 2C. That is the Poisson-subsampled Gaussian
  under add-or-remove with sensitivity 2C, so ``sensitivity`` = 2 and Opacus' accountants apply
  with noise multiplier sigma / 2.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any


class PrivacyUnit(StrEnum):
    RECORD = "record"
    IDENTITY = "identity"


class Relation(StrEnum):
    REPLACE_ONE = "replace_one"
    ADD_OR_REMOVE = "add_or_remove"


class Mechanism(StrEnum):
    GAUSSIAN = "gaussian"
    SKELLAM = "skellam"


@dataclass(frozen=True)
class DpEvent:
    """``steps`` applications of a Poisson-subsampled Gaussian mechanism, or of a Poisson-subsampled
    sum with Skellam noise (``mechanism`` ``skellam``: distributed DP over a secure sum).

    ``noise_multiplier`` is the noise standard deviation over the clipping norm C; 0 means no
    noise (a non-private run, infinite epsilon). ``sensitivity`` is the L2 sensitivity of the
    noisy sum in units of C under ``relation``. A Skellam event's sum is of integers: its noise
    standard deviation is ``noise_multiplier * grid_l2`` grid steps, and ``grid_l2``/``grid_l1``
    are the L2/L1 sensitivities in grid steps (``fedclip.distributed.grid``), which its Renyi DP
    needs beside their ratio; it is add-or-remove with ``sensitivity`` 1.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    privacy_unit: PrivacyUnit
    relation: Relation
    sensitivity: float
    mechanism: Mechanism = Mechanism.GAUSSIAN
    grid_l2: float = 0.0
    grid_l1: float = 0.0

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier: expected a finite value >= 0, got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate: expected a value in (0, 1], got {self.sample_rate}")
        if self.steps < 0 or int(self.steps) != self.steps:
            raise ValueError(f"steps: expected an integer >= 0, got {self.steps}")
        if not self.sensitivity > 0:
            raise ValueError(f"sensitivity: expected > 0, got {self.sensitivity}")
        object.__setattr__(self, "privacy_unit", PrivacyUnit(self.privacy_unit))
        object.__setattr__(self, "relation", Relation(self.relation))
        object.__setattr__(self, "steps", int(self.steps))
        object.__setattr__(self, "mechanism", Mechanism(self.mechanism))
        if self.mechanism == Mechanism.SKELLAM:
            if self.relation != Relation.ADD_OR_REMOVE or self.sensitivity != 1:
                raise ValueError("skellam events: expected relation add_or_remove with sensitivity 1")
            if not (self.grid_l2 >= 1 and self.grid_l1 >= 1 and math.isfinite(self.grid_l2 + self.grid_l1)):
                raise ValueError(f"grid_l2, grid_l1: expected finite values >= 1, got {self.grid_l2}, {self.grid_l1}")

    @property
    def is_private(self) -> bool:
        return self.noise_multiplier > 0 or self.steps == 0

    def to_dict(self) -> dict[str, Any]:
        out = {k: str(v) if isinstance(v, StrEnum) else v for k, v in asdict(self).items()}
        if self.mechanism == Mechanism.GAUSSIAN:  # the form every earlier ledger holds
            for k in ("mechanism", "grid_l2", "grid_l1"):
                out.pop(k)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DpEvent":
        fields = {"noise_multiplier", "sample_rate", "steps", "privacy_unit", "relation", "sensitivity"}
        missing = fields - set(data)
        if missing:
            raise ValueError(f"privacy event: missing field(s) {sorted(missing)}")
        optional = {k: data[k] for k in ("mechanism", "grid_l2", "grid_l1") if k in data}  # older ledgers: Gaussian
        return cls(**{k: data[k] for k in fields}, **optional)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DpEvent":
        return cls.from_dict(json.loads(text))


def events_to_wire(events: "tuple[DpEvent, ...] | list[DpEvent]") -> list[str]:
    """Events as a list of JSON strings (a Flower ``ConfigRecord`` value)."""
    return [e.to_json() for e in events]


def events_from_wire(values: Any) -> tuple[DpEvent, ...]:
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"privacy events: expected a non-empty list of JSON events, got {values!r}")
    return tuple(DpEvent.from_json(v) for v in values)
