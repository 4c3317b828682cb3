"""Configuration of a site's local training, validated once at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from fedclip.privacy.accountant import OPACUS_ACCOUNTANTS, check_delta
from fedclip.privacy.events import PrivacyUnit, Relation


class Mode(StrEnum):
    """``microbatch``: micro-batches of ``microbatch_size`` units, Poisson-sampled, each clipped
    (one unit each: add-or-remove; several, by a fixed keyed hash: replace-one);
    ``unit``: every unit's own loss against public negatives, Poisson-sampled units, each clipped
    (add-or-remove); ``paper``: the Poisson-sampled batch is one clipped micro-batch, as DP-CLIP
    describes (add-or-remove, sensitivity 2C); ``nonprivate``: same sampling, no clipping, no noise."""

    MICROBATCH = "microbatch"
    UNIT = "unit"
    PAPER = "paper"
    NONPRIVATE = "nonprivate"
    DISTRIBUTED = "distributed"


@dataclass(frozen=True, kw_only=True)
class DpConfig:
    """Privacy-critical settings; keyword-only so that no argument lands in the wrong place.

    ``sample_rate`` is the Poisson rate of micro-batches (``microbatch``) or of units (``unit``,
    ``paper``, ``nonprivate``). ``microbatch_size`` is the number of units per micro-batch: 1 makes
    every unit its own micro-batch; more spreads units over ceil(declared_units / size) fixed
    micro-batches by a keyed hash. ``declared_units`` is a *public* number the site declares (its
    approximate size): the noisy sum is divided by ``sample_rate * declared_units`` (or by the
    expected number of micro-batches), never by a count of the data, whose exact value would
    otherwise show in the update's noise scale.
    """

    mode: Mode = Mode.MICROBATCH
    privacy_unit: PrivacyUnit = PrivacyUnit.IDENTITY
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    sample_rate: float = 0.5
    microbatch_size: int = 1
    declared_units: int = 0
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
        if self.microbatch_size < 1:
            raise ValueError(f"microbatch_size: expected an integer >= 1, got {self.microbatch_size}")
        if self.mode == Mode.DISTRIBUTED and self.microbatch_size != 1:
            raise ValueError(
                f"microbatch_size: dp-mode distributed clips every unit on its own (add-or-remove), got {self.microbatch_size}"
            )
        if self.mode in (Mode.MICROBATCH, Mode.UNIT, Mode.DISTRIBUTED) and self.declared_units < 1:
            raise ValueError(
                f"declared_units: expected the public number of units (an integer >= 1) in mode "
                f"{self.mode}, got {self.declared_units}"
            )
        if self.mode != Mode.NONPRIVATE and not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(
                f"noise_multiplier: expected a finite value > 0 in mode {self.mode}, got {self.noise_multiplier} "
                "(use mode 'nonprivate' for a run without noise)"
            )
        check_delta(self.delta)
        if self.accountant not in OPACUS_ACCOUNTANTS:
            raise ValueError(f"accountant: expected one of {OPACUS_ACCOUNTANTS}, got {self.accountant!r}")

    @property
    def per_unit(self) -> bool:
        """Every unit is its own clipped term (``unit``, or ``microbatch`` of size 1)."""
        return self.mode in (Mode.UNIT, Mode.DISTRIBUTED) or (
            self.mode == Mode.MICROBATCH and self.microbatch_size == 1
        )

    @property
    def num_blocks(self) -> int:
        """Fixed keyed-hash blocks: micro-batches of size > 1, and the blocks a released loss is
        computed over (a public number either way)."""
        return max(1, -(-max(self.declared_units, 1) // self.microbatch_size))

    @property
    def expected_terms(self) -> float:
        """What the noisy sum is divided by: a public number, never a count of the data."""
        if self.mode == Mode.PAPER or self.mode == Mode.NONPRIVATE:
            return 1.0
        return self.sample_rate * (self.declared_units if self.per_unit else self.num_blocks)

    @property
    def relation(self) -> Relation:
        """Units in shared fixed micro-batches: one unit replaces a clipped term (replace-one); one
        unit per term: it adds or removes the term (add-or-remove)."""
        return Relation.REPLACE_ONE if self.mode == Mode.MICROBATCH and not self.per_unit else Relation.ADD_OR_REMOVE

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of the noisy sum in units of C (see ``fedclip.privacy.events``)."""
        return 2.0 if self.mode == Mode.PAPER else 1.0


OPTIMIZERS = ("adamw", "sgd")
# How per-group gradients are computed (same numbers, different cost): ``hooks`` = one backward
# with Opacus' grad-sample hooks (``group_grads``), ``vmap`` = the reference, one vectorised
# backward per group (``microbatch_grads``), ``auto`` = hooks where the model supports them.
GRAD_ENGINES = ("auto", "hooks", "vmap", "ghost")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """``optimizer``: ``adamw``, or ``sgd`` with Nesterov momentum 0.9. Under DP, Adam divides every
    coordinate by its own running RMS, so a coordinate whose gradient is pure noise still moves by
    about ``lr`` every step; SGD moves it by the noise itself, which averaging shrinks."""

    steps: int = 30
    lr: float = 5e-4
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    microbatch_chunk: int | None = None
    negative_bank_size: int = 256
    grad_engine: str = "auto"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps: expected an integer >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay: expected >= 0, got {self.weight_decay}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.negative_bank_size < 1:
            raise ValueError(f"negative_bank_size: expected an integer >= 1, got {self.negative_bank_size}")
        if self.grad_engine not in GRAD_ENGINES:
            raise ValueError(f"grad_engine: expected one of {GRAD_ENGINES}, got {self.grad_engine!r}")
        if self.microbatch_chunk is not None and self.microbatch_chunk < 1:
            raise ValueError(f"microbatch_chunk: expected an integer >= 1 or None, got {self.microbatch_chunk}")
