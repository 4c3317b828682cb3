"""Likelihood-ratio membership attacks on records and on patients, against the base model or reference models.

A likelihood-ratio attack (LiRA, Carlini et al., S&P 2022) asks how much more likely the model
makes a target than models that never saw it. Its offline form needs only such "out" models; the
cheapest sound one for fine-tuning is the model the fine-tuning started from, which never saw any
target and has the same architecture and history as every model in the run (the reference-model
attacks on fine-tuned language models use the pre-trained model the same way: Mireshghallah et
al. 2022, Mattern et al. 2023). The score of a target is

    log p(target | model)  -  log p(target | base model),

which removes how easy each target is to begin with. With reference models
(``fedclip.attacks.reference_models``: the run's recipe on the public population, so every one is
"out" for every target; ``add_reference``), the score is LiRA's offline test with a fixed variance
(Carlini et al., Section VI-C, the variant for few reference models):

    (log p(target | model) - mean_k log p(target | reference k)) / s,

s the reference models' spread about each target's mean, pooled over targets (a per-target
variance needs dozens of reference models). This also removes what fine-tuning does to every
target alike. RMIA (Zarifzadeh et al. 2024) offline ranks targets by p(target | model) over the
references' (adjusted) mean probability, against a population; with few references its ranking,
hence AUC and TPR at any FPR, is close to this one, and with the base model alone it is the same.

- **Records** (``lira-record``): the attacker holds an exact (image, report) pair. p is the
  softmax probability of the pair's own report among all targets' reports given the image.
  Members: training pairs; non-members: held-out patients' pairs (same generator, same reports).
- **Patients** (``lira-patient``): the attacker holds a person's name and other photos, as in IDIA.
  p is the probability of the true name among IDIA's candidates, averaged over query photos and
  templates in log space: a continuous IDIA, which ranks people where IDIA's vote only counts.

The decision (``predicted_member``) is the score above the median: the attack's figures are its
AUC and TPR at low FPR, which need no threshold; the decision only gives TPR, FPR and the
indicative bound a common form with IDIA.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Self

import numpy as np
import pandas as pd
import torch

from fedclip.attacks.base import AttackDecisions
from fedclip.attacks.idia import IdiaConfig, IdiaTargets
from fedclip.data.schema import Split
from fedclip.data.tensors import load_images
from fedclip.evaluation.encode import encode_images, encode_texts


def _scale(model: torch.nn.Module) -> float:
    return float(model.logit_scale.exp().clamp(max=100)) if hasattr(model, "logit_scale") else 100.0


@torch.no_grad()
def report_log_probs(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> np.ndarray:
    """log p(report i | image i) over all reports, at the model's own temperature, per pair."""
    logits = _scale(model) * encode_images(model, images) @ encode_texts(model, tokens).T
    return (logits.diagonal() - torch.logsumexp(logits, dim=1)).cpu().numpy()


@torch.no_grad()
def name_log_probs(
    model: torch.nn.Module,
    targets: IdiaTargets,
    *,
    tokenizer: Callable[[list[str]], torch.Tensor],
    templates: tuple[str, ...],
) -> np.ndarray:
    """Per person: log p(true name | photo, template) among the candidates, mean over photos and templates."""
    people, n = targets.images.shape[:2]
    images = encode_images(model, targets.images.flatten(0, 1))
    truth = torch.as_tensor(np.repeat(targets.truth, n))
    total = np.zeros(people)
    for template in templates:
        logits = (
            _scale(model)
            * images
            @ encode_texts(model, tokenizer([template.format(name=c) for c in targets.candidates])).T
        )
        log_p = logits.gather(1, truth[:, None]).squeeze(1) - torch.logsumexp(logits, dim=1)
        total += log_p.view(people, n).mean(dim=1).cpu().numpy()
    return total / len(templates)


class _Reference:
    """Each target's "out" scores: the base model's, then the reference models' as they are added."""

    def __init__(self, base: np.ndarray) -> None:
        self.base, self.out = base, []

    def add(self, scores: np.ndarray) -> None:
        self.out.append(scores)

    def score(self, observed: np.ndarray) -> np.ndarray:
        """Offline LiRA with a fixed variance; with no reference model, the ratio to the base model."""
        if not self.out:
            return observed - self.base
        out = np.stack(self.out)
        mean = out.mean(axis=0)
        if len(out) < 2:
            return observed - mean
        spread = float(np.sqrt(out.var(axis=0, ddof=1).mean()))
        return (observed - mean) / spread if spread > 0 else observed - mean


class _ReferenceScored:
    """What both attacks share: ``reference`` (a ``_Reference``) and ``_log_probs(model)``."""

    reference: _Reference

    def _log_probs(self, model: torch.nn.Module) -> np.ndarray:
        raise NotImplementedError

    def add_reference(self, model: torch.nn.Module) -> None:
        """One more reference model that never saw a target (``fedclip.attacks.reference_models``)."""
        self.reference.add(self._log_probs(model))

    def reference_state(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """The base model's scores and each reference model's, as added (``reference_cache`` saves them)."""
        return self.reference.base, list(self.reference.out)

    def restore_references(self, out: Sequence[np.ndarray]) -> None:
        """Reference scores saved by an earlier attempt of this run, in place of training the models again."""
        self.reference.out = [np.asarray(o) for o in out]

    def sibling(self) -> Self:
        """The same attack on the same targets, collecting its own reference models (the replies' view)."""
        twin = copy.copy(self)
        twin.reference = _Reference(self.reference.base)
        return twin


def _decisions(attack: str, *, targets, sites, is_member: np.ndarray, score: np.ndarray) -> AttackDecisions:
    frame = pd.DataFrame(
        {
            "target": list(targets),
            "site": list(sites),
            "is_member": is_member,
            "predicted_member": score > np.median(score),
            "score": score,
        }
    )
    return AttackDecisions(attack=attack, frame=frame)


class RecordLikelihoodRatio(_ReferenceScored):
    """``attack(model)``: one decision and score per target record (image and report)."""

    name = "lira-record"

    def __init__(
        self,
        frame: pd.DataFrame,
        *,
        reference: torch.nn.Module,
        preprocess: Callable,
        tokenizer: Callable[[list[str]], torch.Tensor],
        max_per_side: int = 500,
        seed: int = 0,
    ):
        """``frame``: the auditor's manifest; members are its ``train`` rows, non-members its
        ``heldout`` rows, at most ``max_per_side`` of each (a fixed sample: the auditor's choice)."""
        if max_per_side < 1:
            raise ValueError(f"lira-records: expected an integer >= 1 records per side, got {max_per_side}")
        sides = []
        for split in (Split.TRAIN, Split.HELDOUT):
            rows = frame[frame["split"] == str(split)]
            if rows.empty:
                raise ValueError(
                    f"lira-record: the auditor's manifest has no '{split}' rows; the record attack needs "
                    "training pairs (members) and held-out pairs (non-members)"
                )
            sides.append(
                rows.sample(n=min(max_per_side, len(rows)), random_state=seed) if len(rows) > max_per_side else rows
            )
        rows = pd.concat(sides)
        self.ids = tuple(rows["filepath"])
        self.is_member = (rows["split"] == str(Split.TRAIN)).to_numpy()
        self.sites = tuple(str(s) if m else "" for s, m in zip(rows["site"], self.is_member))
        self.images = load_images(rows, preprocess=preprocess)
        self.tokens = tokenizer(list(rows["title"]))
        self.reference = _Reference(self._log_probs(reference))

    def _log_probs(self, model: torch.nn.Module) -> np.ndarray:
        return report_log_probs(model, self.images, self.tokens)

    def __call__(self, model: torch.nn.Module) -> AttackDecisions:
        score = self.reference.score(self._log_probs(model))
        return _decisions(self.name, targets=self.ids, sites=self.sites, is_member=self.is_member, score=score)


class PatientLikelihoodRatio(_ReferenceScored):
    """``attack(model)``: one decision and score per target person (IDIA's targets and candidates)."""

    name = "lira-patient"

    def __init__(
        self,
        targets: IdiaTargets,
        *,
        reference: torch.nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        config: IdiaConfig,
    ):
        self.targets, self.tokenizer, self.templates = targets, tokenizer, config.templates
        self.reference = _Reference(self._log_probs(reference))

    def _log_probs(self, model: torch.nn.Module) -> np.ndarray:
        return name_log_probs(model, self.targets, tokenizer=self.tokenizer, templates=self.templates)

    def __call__(self, model: torch.nn.Module) -> AttackDecisions:
        t = self.targets
        return _decisions(
            self.name,
            targets=t.patient_ids,
            sites=t.sites,
            is_member=t.is_member,
            score=self.reference.score(self._log_probs(model)),
        )
