"""One round's plan for a site: everything it is told, and the privacy events that will cost.

The plan is the whole train message (and the query's): a site reads the plan and its own node
config, nothing else. The server builds it from its configuration and charges its events *before*
sending it; the site parses the same plan from the message, checks it against its own policy,
charges its own ledger and trains. Both sides derive the events with the same functions
(``training_event``, ``release_events``), so they agree unless something went wrong, and then
the strategy charges what was reported in full.

Sections: ``dp``, ``train``, ``release`` and ``input`` (what is privatized and how); ``data``
(model and data split, the same for every site); ``files`` (a simulation's shared paths; None in a
deployment, where a hospital reads its node config); ``secure`` (dp-mode distributed: the grid and
each site's noise share); and the run's bookkeeping (``round_offset``, ``run_name``, ``gradient_canaries``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from fedclip.distributed.grid import Grid
from fedclip.privacy.events import DpEvent, Mechanism, Relation
from fedclip.privacy.guarantee import Guarantee, guarantee_of
from fedclip.privacy.randomness import reproducible_site_seed
from fedclip.privacy.release import ReleaseConfig, release_events
from fedclip.privatize.plan import InputPlan
from fedclip.training.config import DpConfig, TrainConfig
from fedclip.training.local import training_event

PLAN_KEYS = (
    "dp-mode",
    "privacy-unit",
    "noise-multiplier",
    "max-grad-norm",
    "sample-rate",
    "microbatch-size",
    "declared-units",
    "delta",
    "accountant",
    "local-steps",
    "lr",
    "optimizer",
    "negative-bank-size",
    "release-loss-noise",
    "release-loss-bound",
    "release-count-noise",
    "reproducible-noise",
    "seed",
)


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
class SiteData:
    """The model and the data split every site of a run trains (simulated sites split the shared
    manifest by ``num_sites`` and the plan's seed; a deployed site reads its own manifest)."""

    arch: str = "fedclip-tiny"
    trainable: str = "last-1"
    num_sites: int = 1
    pool_sites: bool = False
    allow_outside_paths: bool = False

    def to_record(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "trainable": self.trainable,
            "num-sites": self.num_sites,
            "pool-sites": self.pool_sites,
            "allow-outside-paths": self.allow_outside_paths,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "SiteData":
        _require(record, ("arch", "trainable", "num-sites", "pool-sites", "allow-outside-paths"))
        return cls(
            arch=str(record["arch"]),
            trainable=str(record["trainable"]),
            num_sites=int(record["num-sites"]),
            pool_sites=bool(record["pool-sites"]),
            allow_outside_paths=bool(record["allow-outside-paths"]),
        )


@dataclass(frozen=True, kw_only=True)
class SharedFiles:
    """Where a simulated site finds the shared data, base weights, its state folder and its policy:
    one person plays every party. A deployment sends no path (``RoundPlan.files`` is None)."""

    manifest: str
    checkpoint: str
    site_state_root: str
    site_policy_file: str = ""
    declared_units_map: str = ""  # "site=n,...": each simulated site's public size

    def to_record(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest,
            "checkpoint": self.checkpoint,
            "site-state-root": self.site_state_root,
            "site-policy-file": self.site_policy_file,
            "declared-units-map": self.declared_units_map,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "SharedFiles | None":
        if "manifest" not in record:
            return None
        _require(record, ("checkpoint", "site-state-root"))
        return cls(
            manifest=str(record["manifest"]),
            checkpoint=str(record["checkpoint"]),
            site_state_root=str(record["site-state-root"]),
            site_policy_file=str(record.get("site-policy-file", "")),
            declared_units_map=str(record.get("declared-units-map", "")),
        )


def _require(record: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(f"round plan: the message lacks {missing}")


@dataclass(frozen=True, kw_only=True)
class SecureSumPlan:
    """Distributed DP (dp-mode distributed): the grid every site rounds its clipped sum onto and
    the Skellam share it adds; the full noise exists only in the secure sum (``strategies.secure_sum``).
    Shares are planned so that ``threshold`` of them (the fewest a decodable sum holds) carry the
    calibrated variance: more survivors only add noise."""

    bits: int
    threshold: int
    colluders: int
    scale: float
    dim: int
    share_variance: float
    level: str = "patient"  # patient: one DP-SGD step's clipped sum; site: each site's clipped update
    clip: float = 1.0  # the L2 norm a term of the sum is clipped to (a unit's gradient, or a site's update)

    def __post_init__(self) -> None:
        if self.level not in ("patient", "site"):
            raise ValueError(f"secure-agg-level: expected 'patient' or 'site', got {self.level!r}")

    def grid(self) -> Grid:
        return Grid(scale=self.scale, bits=self.bits, dim=self.dim)

    def event(self, dp: DpConfig, *, shares: int) -> DpEvent:
        """One sum holding ``shares`` shares (the plan: ``threshold``): Poisson-sampled units at
        patient level; every selected site, unsampled, at site level."""
        sens = self.grid().sensitivity(clip=self.clip)
        return DpEvent(
            noise_multiplier=math.sqrt(shares * self.share_variance) / sens.l2,
            sample_rate=dp.sample_rate if self.level == "patient" else 1.0,
            steps=1,
            privacy_unit=dp.privacy_unit,
            relation=Relation.ADD_OR_REMOVE,
            sensitivity=1.0,
            mechanism=Mechanism.SKELLAM,
            grid_l2=sens.l2,
            grid_l1=sens.l1,
        )

    def to_record(self) -> dict[str, Any]:
        return {
            "secure-agg-bits": self.bits,
            "secure-agg-threshold": self.threshold,
            "secure-agg-colluders": self.colluders,
            "secure-agg-scale": self.scale,
            "secure-agg-dim": self.dim,
            "secure-agg-share-variance": self.share_variance,
            "secure-agg-level": self.level,
            "secure-agg-clip": self.clip,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "SecureSumPlan | None":
        if not record.get("secure-agg-dim"):
            return None
        _require(record, ("secure-agg-bits", "secure-agg-threshold", "secure-agg-colluders", "secure-agg-scale"))
        _require(record, ("secure-agg-share-variance", "secure-agg-level", "secure-agg-clip"))
        return cls(
            bits=int(record["secure-agg-bits"]),
            threshold=int(record["secure-agg-threshold"]),
            colluders=int(record["secure-agg-colluders"]),
            scale=float(record["secure-agg-scale"]),
            dim=int(record["secure-agg-dim"]),
            share_variance=float(record["secure-agg-share-variance"]),
            level=str(record["secure-agg-level"]),
            clip=float(record["secure-agg-clip"]),
        )


@dataclass(frozen=True, kw_only=True)
class RoundPlan:
    dp: DpConfig
    train: TrainConfig
    release: ReleaseConfig
    reproducible_noise: bool = False
    seed: int = 0
    input: InputPlan | None = None  # input-level privatization (CADP, MaskDP): once per site, before training
    data: SiteData = SiteData()
    files: SharedFiles | None = None  # a simulation's shared paths; None in a deployment
    round_offset: int = 0  # rounds run before a resume: the site's round is the server's round plus this
    run_name: str = ""  # the server's durable name of the run (a site's max-epsilon-run), kept across resumes
    gradient_canaries: str = ""  # the auditor's Dirac canaries per site (simulation only; wire form)
    secure: SecureSumPlan | None = None  # dp-mode distributed: the grid and the noise share

    def events(self, adversary: str = "server") -> tuple[DpEvent, ...]:
        """Every round's events. Training on privatized inputs is post-processing (no steps),
        unless the privatization claims no epsilon (mask-replace): then it is non-private training.
        A distributed round is one Skellam sum with the shares ``adversary`` cannot subtract, at the
        fewest survivors a decodable sum has (``threshold``): the server alone all of them, with
        colluding sites ``threshold - colluders``, a site trusting nobody its own one."""
        if self.secure is not None and self.secure.level == "patient":
            shares = {
                "server": self.secure.threshold,
                "colluding": self.secure.threshold - self.secure.colluders,
                "own-share": 1,
            }[adversary]
            return (self.secure.event(self.dp, shares=shares),) + release_events(
                self.release, privacy_unit=self.dp.privacy_unit
            )
        training = training_event(self.dp, self.train)
        if self.input is not None and self.input.claims_epsilon:
            training = replace(training, steps=0)
        return (training,) + release_events(self.release, privacy_unit=self.dp.privacy_unit)

    def input_release(self) -> DpEvent | None:
        """The one-time event of a site's input privatization, charged in the round it happens."""
        return self.input.release_event(self.dp.privacy_unit) if self.input is not None else None

    def guarantee(self) -> Guarantee:
        """What the sites' epsilon under this plan is about (``fedclip.privacy.guarantee``)."""
        return guarantee_of(
            mode=self.mode, privacy_unit=str(self.dp.privacy_unit), microbatch_size=self.dp.microbatch_size
        )

    @property
    def mode(self) -> str:
        """What a site's policy sees: the input privatization, else the training mode."""
        return self.input.method if self.input is not None else str(self.dp.mode)

    def reproducible_seed(self, *, round_: int, site: str) -> int | None:
        """None (OS entropy) unless reproducible noise was asked for, which is not private."""
        return reproducible_site_seed(seed=self.seed, round_=round_, site=site) if self.reproducible_noise else None

    def to_record(self) -> dict[str, Any]:
        return {
            "dp-mode": str(self.dp.mode),
            "privacy-unit": str(self.dp.privacy_unit),
            "noise-multiplier": self.dp.noise_multiplier,
            "max-grad-norm": self.dp.max_grad_norm,
            "sample-rate": self.dp.sample_rate,
            "microbatch-size": self.dp.microbatch_size,
            "declared-units": self.dp.declared_units,
            "delta": self.dp.delta,
            "accountant": self.dp.accountant,
            "local-steps": self.train.steps,
            "lr": self.train.lr,
            "optimizer": self.train.optimizer,
            "negative-bank-size": self.train.negative_bank_size,
            "grad-engine": self.train.grad_engine,
            "release-loss-noise": self.release.loss_noise,
            "release-loss-bound": self.release.loss_bound,
            "release-count-noise": self.release.count_noise,
            "reproducible-noise": self.reproducible_noise,
            "seed": self.seed,
            **(self.input.to_record() if self.input is not None else {"input-privacy": ""}),
            **self.data.to_record(),
            **(self.files.to_record() if self.files is not None else {}),
            "round-offset": self.round_offset,
            "run-name": self.run_name,
            "gradient-canary-plan": self.gradient_canaries,
            **(self.secure.to_record() if self.secure is not None else {}),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any], *, hash_key: str, declared_units: int | None = None) -> "RoundPlan":
        """The plan as a site reads it; ``declared_units`` is the site's own public size if it
        declares one (a deployed site, in its node config), else the plan's value for this site."""
        _require(record, PLAN_KEYS)
        dp = DpConfig(
            mode=str(record["dp-mode"]),
            privacy_unit=str(record["privacy-unit"]),
            noise_multiplier=float(record["noise-multiplier"]),
            max_grad_norm=float(record["max-grad-norm"]),
            sample_rate=float(record["sample-rate"]),
            microbatch_size=int(record["microbatch-size"]),
            declared_units=int(declared_units or record["declared-units"]),
            delta=float(record["delta"]),
            accountant=str(record["accountant"]),
            hash_key=hash_key,
        )
        return cls(
            dp=dp,
            train=TrainConfig(
                steps=int(record["local-steps"]),
                lr=float(record["lr"]),
                optimizer=str(record["optimizer"]),
                negative_bank_size=int(record["negative-bank-size"]),
                # speed only (same gradients): optional for older servers
                grad_engine=str(record.get("grad-engine", "auto")),
            ),
            release=ReleaseConfig(
                loss_noise=float(record["release-loss-noise"]),
                loss_bound=float(record["release-loss-bound"]),
                count_noise=float(record["release-count-noise"]),
            ),
            reproducible_noise=bool(record["reproducible-noise"]),
            seed=int(record["seed"]),
            input=InputPlan.from_record(record),
            data=SiteData.from_record(record),
            files=SharedFiles.from_record(record),
            round_offset=int(record.get("round-offset", 0)),
            run_name=str(record.get("run-name", "")),
            gradient_canaries=str(record.get("gradient-canary-plan", "")),
            secure=SecureSumPlan.from_record(record),
        )
