"""The attacks an auditor runs on one set of targets: IDIA and the likelihood-ratio attacks.

One place builds them, for the server playing auditor in a simulation and for ``fedclip audit``
on saved models, so both run the same attacks on the same targets.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch

from fedclip.attacks.base import Attack
from fedclip.attacks.idia import IdentityInferenceAttack, IdiaConfig, IdiaTargets
from fedclip.attacks.likelihood_ratio import PatientLikelihoodRatio, RecordLikelihoodRatio
from fedclip.data.schema import Split


def target_attacks(
    frame: pd.DataFrame,
    *,
    idia: IdiaConfig,
    lira_records: int,
    reference: torch.nn.Module,
    preprocess: Callable,
    tokenizer: Callable[[list[str]], torch.Tensor],
) -> list[Attack]:
    """IDIA, and with ``lira_records`` > 0 the likelihood-ratio attacks on people and on records
    (``reference``: the base model, before any round). The record attack needs training pairs;
    an auditor who holds only names and photos gets the others, and is told so."""
    targets = IdiaTargets.from_frame(frame, config=idia, preprocess=preprocess)
    attacks: list[Attack] = [IdentityInferenceAttack(targets, tokenizer=tokenizer, config=idia)]
    if lira_records <= 0:
        return attacks
    attacks.append(PatientLikelihoodRatio(targets, reference=reference, tokenizer=tokenizer, config=idia))
    if (frame["split"] == str(Split.TRAIN)).any():
        attacks.append(
            RecordLikelihoodRatio(
                frame,
                reference=reference,
                preprocess=preprocess,
                tokenizer=tokenizer,
                max_per_side=lira_records,
                seed=idia.seed,
            )
        )
    else:
        print(
            "lira-record: not run, the auditor's targets hold no training pairs ('train' rows); the record attack "
            "needs the exact pairs it asks about",
            flush=True,
        )
    return attacks
