"""The attack interface: small enough that a second attack is a new file, not a strategy change.

An attack looks at a model and returns one decision per target (a person or a record): is it a
member of the training data? Metrics and the empirical epsilon bound are computed from the
decisions by ``fedclip.attacks.metrics``, the same way for every attack.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import pandas as pd
import torch


@dataclass(frozen=True)
class AttackDecisions:
    """One row per target: ``target``, ``site`` ("" for non-members), ``is_member`` (truth),
        ``predicted_member`` (the attack's call), optionally ``score`` (higher: more likely a member;
        gives AUC and TPR at low FPR), plus attack-specific columns. ``randomised``: membership was a
        fair coin per target (canaries), so the one-run epsilon lower bound applies. ``white_box``: the
    scores are Dirac gradient canaries' displacements, so the Gaussian-pair audit applies too."""

    attack: str
    frame: pd.DataFrame
    randomised: bool = False
    white_box: bool = False

    def __post_init__(self) -> None:
        missing = {"target", "site", "is_member", "predicted_member"} - set(self.frame.columns)
        if missing:
            raise ValueError(f"decisions: missing column(s) {sorted(missing)}")


class Attack(Protocol):
    """What every attack and audit is: a name and a call on a model.

    Attributes
    ----------
    name : str
        The ``attack`` column of ``attack.csv`` (``idia``, ``lira-patient``, ``canary``, ...).
    randomised : bool, optional
        True for audits whose targets' membership was a fair coin (canaries): their certified
        bound applies, and the run splits its confidence over them. Absent means False.

    Calling it with a model returns ``AttackDecisions``: one row per target, with the truth, the
    call and, if the attack scores, a score.
    """

    name: str

    def __call__(self, model: torch.nn.Module) -> AttackDecisions: ...
