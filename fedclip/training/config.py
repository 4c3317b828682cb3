"""Configuration of a site's local training, validated once at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from fedclip.privacy.accountant import OPACUS_ACCOUNTANTS, check_delta
from fedclip.privacy.events import PrivacyUnit, Relation


class Mode(StrEnum):
    """``microbatch``: fixed hashed micro-batches, Poisson-sampled, each clipped (replace-one);
    ``paper``: the Poisson-sampled batch is one clipped micro-batch, as DP-CLIP describes
    (add-or-remove, sensitivity 2C); ``nonprivate``: same sampling, no clipping, no noise."""

    MICROBATCH = "microbatch"
    PAPER = "paper"
    NONPRIVATE = "nonprivate"


@dataclass(frozen=True, kw_only=True)
class DpConfig:
    """Privacy-critical settings; keyword-only so that no argument lands in the wrong place.

    ``sample_rate`` is the Poisson rate of micro-batches (``microbatch``) or of units (``paper``,
    ``nonprivate``). ``num_microbatches`` is the number of fixed hashed micro-batches a site's
    units are spread over (``microbatch`` only).
    """

    mode: Mode = Mode.MICROBATCH
    privacy_unit: PrivacyUnit = PrivacyUnit.IDENTITY
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    sample_rate: float = 0.5
    num_microbatches: int = 6
    delta: float = 1e-5
    accountant: str = "prv"
    hash_key: str = "fedclip-microbatches"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode(self.mode))
        object.__setattr__(self, "privacy_unit", PrivacyUnit(self.privacy_unit))
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"max_grad_norm: expected a finite value > 0, got {self.max_grad_norm}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate: expected a value in (0, 1], got {self.sample_rate}")
        if self.num_microbatches < 1:
            raise ValueError(f"num_microbatches: expected an integer >= 1, got {self.num_microbatches}")
        if self.mode != Mode.NONPRIVATE and not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(
                f"noise_multiplier: expected a finite value > 0 in mode {self.mode}, got {self.noise_multiplier} "
                "(use mode 'nonprivate' for a run without noise)"
            )
        check_delta(self.delta)
        if self.accountant not in OPACUS_ACCOUNTANTS:
            raise ValueError(f"accountant: expected one of {OPACUS_ACCOUNTANTS}, got {self.accountant!r}")

    @property
    def relation(self) -> Relation:
        return Relation.REPLACE_ONE if self.mode == Mode.MICROBATCH else Relation.ADD_OR_REMOVE

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of the noisy sum in units of C (see ``fedclip.privacy.events``)."""
        return 2.0 if self.mode == Mode.PAPER else 1.0


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 30
    lr: float = 5e-4
    weight_decay: float = 0.0
    microbatch_chunk: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps: expected an integer >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: expected >= 0, got {self.weight_decay}")
        if self.microbatch_chunk is not None and self.microbatch_chunk < 1:
            raise ValueError(f"microbatch_chunk: expected an integer >= 1 or None, got {self.microbatch_chunk}")
