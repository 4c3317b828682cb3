"""Identity inference attack (IDIA, "Does CLIP Know My Face?", Hintersdorf et al.).

For each target person, N query images that were never trained on are ranked zero-shot against
every candidate name (all members, all non-members and random distractor names) under several
prompt templates. Per template, the majority name over the N images is the template's answer
(a tie skips the template); the person is called a member if at least ``tau`` templates name
them correctly. The attacker needs only names and other photos of the person, not the training
images: exactly the threat a hospital worries about.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from fedclip.attacks.base import AttackDecisions
from fedclip.data.names import DEFAULT_NAME_LISTS, check_name_lists, draw_unique_names
from fedclip.data.schema import Split
from fedclip.data.tensors import load_images
from fedclip.evaluation.encode import encode_images, encode_texts

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "{name}",
    "a photo of {name}",
    "a person named {name}",
    "Chest X-ray of {name}",
    "Report for {name}.",
)


@dataclass(frozen=True, kw_only=True)
class IdiaConfig:
    num_queries: int = 5
    tau: int = 1
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    num_distractors: int = 200
    seed: int = 0
    name_lists: str = DEFAULT_NAME_LISTS  # the lists distractor names are drawn from: those the data was named from

    def __post_init__(self) -> None:
        if self.num_queries < 1:
            raise ValueError(f"idia num_queries: expected an integer >= 1, got {self.num_queries}")
        if not self.templates or any("{name}" not in t for t in self.templates):
            raise ValueError(f"idia templates: every template must contain '{{name}}', got {list(self.templates)}")
        if not 1 <= self.tau <= len(self.templates):
            raise ValueError(
                f"idia tau: expected 1 <= tau <= {len(self.templates)} (the number of templates), got {self.tau}"
            )
        check_name_lists(self.name_lists, key="idia name_lists")
        if self.num_distractors < 0:
            raise ValueError(f"idia num_distractors: expected >= 0, got {self.num_distractors}")


def majority_decisions(predicted: np.ndarray, truth: np.ndarray, *, tau: int) -> tuple[np.ndarray, np.ndarray]:
    """The decision rule on predicted candidate indices ``[P, T, N]`` (person, template, image).

    Returns the number of correct templates per person and the membership call (>= tau).
    A template whose top vote count is shared by two names is skipped (counts as not correct).
    """
    people, templates, _ = predicted.shape
    correct = np.zeros(people, dtype=np.int64)
    for p in range(people):
        for t in range(templates):
            names, votes = np.unique(predicted[p, t], return_counts=True)
            top = votes.max()
            if (votes == top).sum() == 1 and names[votes.argmax()] == truth[p]:
                correct[p] += 1
    return correct, correct >= tau


@dataclass(frozen=True)
class IdiaTargets:
    """The attack's inputs, built once per run: query images, true names and candidates."""

    patient_ids: tuple[str, ...]
    sites: tuple[str, ...]
    is_member: np.ndarray
    truth: np.ndarray  # index of each person's name among the candidates
    images: torch.Tensor  # [P, N, 3, H, W]
    candidates: tuple[str, ...]

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, *, config: IdiaConfig, preprocess: Callable) -> "IdiaTargets":
        """Members: patients with training rows, queried with their ``query`` images;
        non-members: held-out patients, queried with their ``heldout`` images."""
        rows = []
        queries = frame[frame["split"].isin([str(Split.QUERY), str(Split.HELDOUT)])]
        for pid, g in queries.groupby("patient_id", sort=True):
            if len(g) < config.num_queries:
                raise ValueError(
                    f"idia num_queries: patient {pid!r} has {len(g)} query images, fewer than num_queries={config.num_queries}"
                )
            rows.append(g.iloc[: config.num_queries])
        if not rows:
            raise ValueError("idia: the manifest has no 'query' or 'heldout' rows to attack with")
        picked = pd.concat(rows)
        first = picked.groupby("patient_id", sort=True).first()
        is_member = (first["split"] == str(Split.QUERY)).to_numpy()
        if is_member.all() or not is_member.any():
            raise ValueError("idia: needs both members ('query' rows) and non-members ('heldout' rows)")
        names = list(first["name"])
        # every member (also one without query images) and every non-member is a candidate
        everyone = names + sorted(set(frame.loc[frame["split"] == str(Split.TRAIN), "name"]) - set(names))
        rng = np.random.default_rng(config.seed)
        candidates = tuple(dict.fromkeys(everyone)) + tuple(
            draw_unique_names(rng, config.num_distractors, exclude=set(everyone), lists=config.name_lists)
        )
        images = load_images(picked, preprocess=preprocess)
        return cls(
            patient_ids=tuple(first.index),
            sites=tuple(first["site"]),
            is_member=is_member,
            truth=np.array([candidates.index(n) for n in names]),
            images=images.view(len(first), config.num_queries, *images.shape[1:]),
            candidates=candidates,
        )


class IdentityInferenceAttack:
    """Callable attack: ``attack(model)`` returns one decision per target person."""

    name = "idia"

    def __init__(self, targets: IdiaTargets, *, tokenizer: Callable[[list[str]], torch.Tensor], config: IdiaConfig):
        self.targets = targets
        self.tokenizer = tokenizer
        self.config = config

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> AttackDecisions:
        t = self.targets
        people, n = t.images.shape[:2]
        image_emb = encode_images(model, t.images.flatten(0, 1)).view(people, n, -1)
        predicted = np.empty((people, len(self.config.templates), n), dtype=np.int64)
        for k, template in enumerate(self.config.templates):
            text_emb = encode_texts(model, self.tokenizer([template.format(name=c) for c in t.candidates]))
            predicted[:, k, :] = (image_emb @ text_emb.T).argmax(dim=-1).cpu().numpy()
        correct, member = majority_decisions(predicted, t.truth, tau=self.config.tau)
        frame = pd.DataFrame(
            {
                "target": t.patient_ids,
                "site": t.sites,
                "is_member": t.is_member,
                "predicted_member": member,
                "correct_templates": correct,
                "score": correct,
            }
        )  # coarse (0..templates), for AUC and TPR at low FPR
        return AttackDecisions(attack=self.name, frame=frame)
