"""The attacker's reference ("out") models for the offline likelihood-ratio attacks.

LiRA's offline form (Carlini et al., S&P 2022, Section VI-C) compares a target's score under the
attacked model with its scores under models that never saw it. The cheapest such model is the
base model (``fedclip.attacks.likelihood_ratio``); it removes how easy each target is, but not
what fine-tuning does to every target alike (a name the public population shares with a target
gains probability whether or not the target trained). Reference models trained the way the run
trains, on data that holds no target, remove that too.

Here the attacker (the server, who knows the mechanism and holds the public population) runs each
reference as a shadow federation: as many shadow sites as the run has sites, each a random sample
of public patients of one site's size (samples may overlap: the public population is smaller than
the sites' together), trained from the base model with the run's own recipe (its rounds of its
local steps, the optimizer reset every round as a site's is, the same trainable parameters,
clipping, noise and sampling) and averaged each round (FedAvg with equal weights: a server-side
optimizer such as FedAdam is not mimicked). The shadow global model is the reference for the
published model; the shadow sites' final-round models are references for the sites' replies (the
server's view): S of them per shadow federation. The public population is disjoint from every
site's patients and from the held-out non-members, so every reference is "out" for every target.

Cost: ``count`` shadow federations, each the run's whole training (sites x rounds x local steps),
on the server, once per run before round 1. The randomness is the attacker's own and seeded
(reproducible), which costs no one privacy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from fedclip.data.tensors import PairData
from fedclip.privacy.microbatches import unit_ids
from fedclip.progress import progress_bar
from fedclip.training.config import DpConfig, Mode, TrainConfig
from fedclip.training.local import train_local


@dataclass(frozen=True)
class Reference:
    """One reference model; ``view``: "global" (a shadow global model) or "reply" (a shadow site's
    final-round model)."""

    model: torch.nn.Module
    view: str


def reference_models(
    base: torch.nn.Module,
    public: PairData,
    *,
    count: int,
    sites: int,
    rounds: int,
    patients: int,
    dp: DpConfig,
    train: TrainConfig,
    seed: int,
) -> Iterator[Reference]:
    """Yield each shadow federation's final-round site models, then its global model, one at a time
    (each may be dropped once scored: a real CLIP is large). ``patients``: one site's size."""
    if count < 1:
        raise ValueError(f"lira-references: expected an integer >= 1 reference models, got {count}")
    if rounds < 1 or sites < 1:
        raise ValueError(f"lira-references: expected >= 1 rounds and sites, got {rounds} and {sites}")
    if dp.mode == Mode.DISTRIBUTED:
        raise ValueError(
            "lira-references: a reference model repeats one site's local training, and dp-mode distributed "
            "has none (each round is one DP-SGD step over every site)"
        )
    people = np.array(sorted(set(public.patient_ids)))
    take = min(patients, len(people))
    if take < 2:
        raise ValueError(
            f"lira-references: a shadow site needs at least 2 public patients to train on, got {take} "
            f"(public population: {len(people)})"
        )
    bar = progress_bar(total=count * sites * rounds, desc="reference models (shadow site rounds)")
    try:
        for k in range(count):
            rng = np.random.default_rng([seed, k])
            shards = [_shadow_site(public, people, take=take, rng=rng, dp=dp) for _ in range(sites)]
            shadow = copy.deepcopy(base)
            for r in range(rounds):
                trained = []
                for data, rest, sized in shards:
                    model = copy.deepcopy(shadow)
                    train_local(
                        model, data, dp=sized, train=train, reproducible_seed=int(rng.integers(2**31)), public=rest
                    )
                    bar.update(1)
                    trained.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
                    if r == rounds - 1:
                        model.eval()
                        yield Reference(model, "reply")
                    del model
                with torch.no_grad():  # FedAvg, equal weights (every shadow site has one size)
                    for name, p in shadow.named_parameters():
                        if p.requires_grad:
                            p.copy_(torch.stack([t[name] for t in trained]).mean(dim=0))
            shadow.eval()
            yield Reference(shadow, "global")
    finally:
        bar.close()


def _shadow_site(
    public: PairData, people: np.ndarray, *, take: int, rng: np.random.Generator, dp: DpConfig
) -> tuple[PairData, PairData, DpConfig]:
    """A shadow site's pairs, the other public pairs (unit mode's negatives) and its DP settings."""
    chosen = set(rng.choice(people, size=take, replace=False))
    rows = [i for i, p in enumerate(public.patient_ids) if p in chosen]
    data = public.subset(rows)
    rest = public.subset([i for i, p in enumerate(public.patient_ids) if p not in chosen] or rows)
    units = len(set(unit_ids(privacy_unit=dp.privacy_unit, patient_ids=data.patient_ids, record_ids=data.record_ids)))
    return data, rest, replace(dp, declared_units=units)  # the shadow site's size: the attacker's own data
