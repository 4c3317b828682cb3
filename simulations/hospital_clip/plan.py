"""One round's plan for a site: what it is asked to run, and the privacy events that will cost.

The server builds the plan from its configuration and charges its events *before* sending it;
the site parses the same plan from the message, checks it against its own policy, charges its
own ledger and trains. Both sides derive the events with the same functions
(``training_event``, ``release_events``), so they agree unless something went wrong, and then
the strategy charges what was reported in full.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from fedclip.privacy.events import DpEvent
from fedclip.privacy.randomness import reproducible_site_seed
from fedclip.privacy.release import ReleaseConfig, release_events
from fedclip.privatize.plan import InputPlan
from fedclip.training.config import DpConfig, TrainConfig
from fedclip.training.local import training_event

PLAN_KEYS = ("dp-mode", "privacy-unit", "noise-multiplier", "max-grad-norm", "sample-rate", "microbatch-size",
             "declared-units", "delta", "accountant", "local-steps", "lr", "optimizer", "negative-bank-size", "release-loss-noise",
             "release-loss-bound", "release-count-noise", "reproducible-noise", "seed")


def parse_site_numbers(text: str, *, key: str) -> dict[str, int]:
    """``"hospital_0=300,hospital_1=250"`` -> {site: n}."""
    out: dict[str, int] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        site, sep, value = item.partition("=")
        if not sep or not site.strip() or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"{key}: expected 'site=n,...' with integers n >= 1, got {item!r}")
        out[site.strip()] = int(value)
    return out


@dataclass(frozen=True, kw_only=True)
class RoundPlan:
    dp: DpConfig
    train: TrainConfig
    release: ReleaseConfig
    reproducible_noise: bool = False
    seed: int = 0
    input: InputPlan | None = None  # input-level privatization (CADP, MaskDP): once per site, before training

    def events(self) -> tuple[DpEvent, ...]:
        """Every round's events. Training on privatized inputs is post-processing (no steps),
        unless the privatization claims no epsilon (mask-replace): then it is non-private training."""
        training = training_event(self.dp, self.train)
        if self.input is not None and self.input.claims_epsilon:
            training = replace(training, steps=0)
        return (training,) + release_events(self.release, privacy_unit=self.dp.privacy_unit)

    def input_release(self) -> DpEvent | None:
        """The one-time event of a site's input privatization, charged in the round it happens."""
        return self.input.release_event(self.dp.privacy_unit) if self.input is not None else None

    @property
    def mode(self) -> str:
        """What a site's policy sees: the input privatization, else the training mode."""
        return self.input.method if self.input is not None else str(self.dp.mode)

    def reproducible_seed(self, *, round_: int, site: str) -> int | None:
        """None (OS entropy) unless reproducible noise was asked for, which is not private."""
        return reproducible_site_seed(seed=self.seed, round_=round_, site=site) if self.reproducible_noise else None

    def to_record(self) -> dict[str, Any]:
        return {
            "dp-mode": str(self.dp.mode), "privacy-unit": str(self.dp.privacy_unit),
            "noise-multiplier": self.dp.noise_multiplier, "max-grad-norm": self.dp.max_grad_norm,
            "sample-rate": self.dp.sample_rate, "microbatch-size": self.dp.microbatch_size,
            "declared-units": self.dp.declared_units, "delta": self.dp.delta,
            "accountant": self.dp.accountant, "local-steps": self.train.steps, "lr": self.train.lr,
            "optimizer": self.train.optimizer, "negative-bank-size": self.train.negative_bank_size,
            "grad-engine": self.train.grad_engine,
            "release-loss-noise": self.release.loss_noise, "release-loss-bound": self.release.loss_bound,
            "release-count-noise": self.release.count_noise, "reproducible-noise": self.reproducible_noise,
            "seed": self.seed, **(self.input.to_record() if self.input is not None else {"input-privacy": ""}),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any], *, hash_key: str, declared_units: int | None = None) -> "RoundPlan":
        """The plan as a site reads it; ``declared_units`` is the site's own public size if it
        declares one (a deployed site, in its node config), else the plan's value for this site."""
        missing = [k for k in PLAN_KEYS if k not in record]
        if missing:
            raise ValueError(f"round plan: the train message lacks {missing}")
        dp = DpConfig(mode=str(record["dp-mode"]), privacy_unit=str(record["privacy-unit"]),
                      noise_multiplier=float(record["noise-multiplier"]), max_grad_norm=float(record["max-grad-norm"]),
                      sample_rate=float(record["sample-rate"]), microbatch_size=int(record["microbatch-size"]),
                      declared_units=int(declared_units or record["declared-units"]),
                      delta=float(record["delta"]), accountant=str(record["accountant"]), hash_key=hash_key)
        return cls(dp=dp, train=TrainConfig(steps=int(record["local-steps"]), lr=float(record["lr"]),
                                            optimizer=str(record["optimizer"]),
                                            negative_bank_size=int(record["negative-bank-size"]),
                                            # speed only (same gradients): optional for older servers
                                            grad_engine=str(record.get("grad-engine", "auto"))),
                   release=ReleaseConfig(loss_noise=float(record["release-loss-noise"]),
                                         loss_bound=float(record["release-loss-bound"]),
                                         count_noise=float(record["release-count-noise"])),
                   reproducible_noise=bool(record["reproducible-noise"]), seed=int(record["seed"]),
                   input=InputPlan.from_record(record))
