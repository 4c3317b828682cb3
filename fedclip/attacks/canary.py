"""The canary audit: score every canary patient on the model, for the one-run epsilon lower bound.

The auditor made the canaries (``fedclip.data.canaries``) and holds their training pairs. A canary
that trained has had its images pulled toward its own reports, so the model gives its own report
a higher probability among all canaries' reports than a model that never saw it. The score of a
canary is the mean, over its training images, of

    log p(own report | image) under the model  -  the same under the reference model,

where p is the softmax over every canary's reports at the model's temperature, and the reference
is the base model the federation started from (public: it never saw a canary). Subtracting the
reference removes how easy each canary is to begin with: a one-reference, offline form of the
likelihood-ratio attack (LiRA, Carlini et al. 2022), as cheap as the attack itself.

The decisions (``predicted_member``: score above the median) give TPR and FPR like any attack;
the scores and the random inclusion give the one-run bound (``fedclip.attacks.one_run``), which
``fedclip.attacks.metrics`` computes for decisions marked ``randomised``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from fedclip.attacks.base import AttackDecisions
from fedclip.attacks.likelihood_ratio import report_log_probs
from fedclip.data.canaries import CanarySet
from fedclip.data.tensors import load_images


class CanaryAudit:
    """Callable attack: ``audit(model)`` returns one decision and one score per canary patient."""

    name = "canary"
    randomised = True  # membership is a fair coin per canary: the one-run bound applies

    def __init__(
        self,
        canaries: CanarySet,
        *,
        reference: torch.nn.Module,
        preprocess: Callable,
        tokenizer: Callable[[list[str]], torch.Tensor],
    ):
        rows = canaries.training_rows().sort_values(["patient_id", "filepath"])
        self.patients = np.array(rows["patient_id"])
        self.images = load_images(rows, preprocess=preprocess)
        self.tokens = tokenizer(list(rows["title"]))
        first = canaries.frame.groupby("patient_id", sort=True).first()
        self.ids = tuple(first.index)
        self.included = first["included"].astype(bool).to_numpy()
        self.sites = tuple(site if inc else "" for site, inc in zip(first["site"], self.included))
        self.reference = self._per_patient(report_log_probs(reference, self.images, self.tokens))

    def _per_patient(self, values: np.ndarray) -> np.ndarray:
        frame = pd.DataFrame({"patient_id": self.patients, "v": values})
        return frame.groupby("patient_id", sort=True)["v"].mean().reindex(self.ids).to_numpy()

    def __call__(self, model: torch.nn.Module) -> AttackDecisions:
        score = self._per_patient(report_log_probs(model, self.images, self.tokens)) - self.reference
        frame = pd.DataFrame(
            {
                "target": self.ids,
                "site": self.sites,
                "is_member": self.included,
                "predicted_member": score > np.median(score),
                "score": score,
            }
        )
        return AttackDecisions(attack=self.name, frame=frame, randomised=True)
