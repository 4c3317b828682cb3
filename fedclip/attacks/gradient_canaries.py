"""Gradient canaries: a white-box one-run audit of the DP mechanism itself.

Data canaries (``fedclip.attacks.canary``) ask what an attacker learns about a patient from the
model; the answer is loose, because a model hides much of what the mechanism would allow.
Gradient canaries ask whether the mechanism is as private as the ledger says. Each is a *Dirac*
canary (Steinke, Nasr and Jagielski 2023, Section 6; Andrew et al. 2024 use random directions for
federated learning): one coordinate j of the trainable parameters, and a fake unit whose gradient
is ``C e_j`` (C: the clipping norm, so clipping leaves it whole). A site inserts each of its
included canaries as one more unit, sampled like every unit; the accountant's guarantee covers it
as it covers a patient. The auditor scores canary j by how far the global model moved *down* that
coordinate since the start (``theta_0[j] - theta_t[j]``): a canary's gradient pushes it down,
noise moves it either way, so a mechanism with less noise than the ledger says is caught.

The server's view (``GradientCanaryReplies``) scores site s's canaries on site s's own replies
instead: the sum over rounds of ``sent[j] - reply[j]`` holds s's noise alone, where the global
model averages in every other site's noise too (about sqrt(S) times less signal per noise with S
sites). It is what the site's local epsilon bounds, and the audit that can come near it.

Which canaries are included is a fair coin each, from a secret of the auditor's (OS entropy).
Here the server is the auditor and sends each simulated site its canaries: one person plays every
party in a simulation. A deployment refuses them (a hospital would have to run the auditor's
canaries, and fedclip does not ship that protocol).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from flwr.app import ArrayRecord

from fedclip.attacks.base import AttackDecisions


@dataclass(frozen=True)
class DiracCanaries:
    """One site's canaries: (parameter name, flat index) each, and whether it is inserted."""

    coordinates: tuple[tuple[str, int], ...]
    included: tuple[bool, ...]

    def __post_init__(self) -> None:
        if len(self.coordinates) != len(self.included):
            raise ValueError("gradient canaries: one inclusion bit per coordinate")

    def inserted(self) -> tuple[tuple[str, int], ...]:
        return tuple(c for c, inc in zip(self.coordinates, self.included) if inc)

    def sampled_rows(
        self, model: torch.nn.Module, *, rate: float, norm: float, generator: torch.Generator
    ) -> dict[str, torch.Tensor] | None:
        """``fedclip.training.extra_units.ExtraUnits``: each inserted canary Poisson-sampled at
        ``rate`` (like every unit), as gradient rows of norm ``norm``; None if none was drawn."""
        inserted = self.inserted()
        if not inserted:
            return None
        drawn = torch.rand(len(inserted), generator=generator, device=generator.device).tolist()
        sampled = [c for c, u in zip(inserted, drawn) if u < rate]
        return canary_rows(model, sampled, norm=norm) if sampled else None


def draw_dirac_canaries(
    model: torch.nn.Module, *, per_site: int, sites: tuple[str, ...], secret: bytes
) -> dict[str, DiracCanaries]:
    """``per_site`` distinct coordinates for each site among the trainable parameters (uniform over
    coordinates), and a fair coin each, from ``secret``."""
    if per_site < 1:
        raise ValueError(f"gradient-canaries: expected >= 1 per site, got {per_site}")
    if len(secret) < 16:
        raise ValueError(f"gradient canaries: expected at least 16 bytes of OS entropy, got {len(secret)}")
    params = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    total = sum(size for _, size in params)
    wanted = per_site * len(sites)
    if wanted > total:
        raise ValueError(f"gradient-canaries: {wanted} canaries but only {total} trainable coordinates")
    rng = np.random.default_rng(int.from_bytes(secret, "big"))
    flat = rng.choice(total, size=wanted, replace=False)
    starts = np.cumsum([0] + [size for _, size in params])
    where = np.searchsorted(starts, flat, side="right") - 1
    coords = [(params[k][0], int(f - starts[k])) for k, f in zip(where, flat)]
    included = rng.random(wanted) < 0.5
    return {
        site: DiracCanaries(
            tuple(coords[i * per_site : (i + 1) * per_site]),
            tuple(bool(b) for b in included[i * per_site : (i + 1) * per_site]),
        )
        for i, site in enumerate(sites)
    }


def canaries_to_wire(canaries: dict[str, DiracCanaries]) -> str:
    return json.dumps(
        {site: [[n, i, inc] for (n, i), inc in zip(c.coordinates, c.included)] for site, c in canaries.items()}
    )


def canaries_from_wire(text: str, site: str) -> DiracCanaries | None:
    """This site's canaries from the train config ("" or no entry: none)."""
    if not text:
        return None
    entries = json.loads(text).get(site)
    if not entries:
        return None
    return DiracCanaries(tuple((str(n), int(i)) for n, i, _ in entries), tuple(bool(inc) for _, _, inc in entries))


def canary_rows(model: torch.nn.Module, coordinates: list[tuple[str, int]], *, norm: float) -> dict[str, torch.Tensor]:
    """Per-sample gradient rows, one per canary: ``norm`` at its coordinate, 0 elsewhere (norm exactly
    ``norm``: clipping at ``norm`` leaves it whole)."""
    rows = {
        n: torch.zeros((len(coordinates), *p.shape), dtype=p.dtype, device=p.device)
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    for r, (name, index) in enumerate(coordinates):
        rows[name][r].view(-1)[index] = norm
    return rows


def coordinate_values(model: torch.nn.Module, coordinates: tuple[tuple[str, int], ...]) -> np.ndarray:
    params = dict(model.named_parameters())
    return np.array([float(params[n].detach().reshape(-1)[i]) for n, i in coordinates])


class _AllCanaries:
    """Every site's canaries in one order: each one's site, coordinate and inclusion."""

    name: str

    def __init__(self, canaries: dict[str, DiracCanaries]) -> None:
        self.sites = tuple(site for site, c in canaries.items() for _ in c.coordinates)
        self.coordinates = tuple(coord for c in canaries.values() for coord in c.coordinates)
        self.included = np.array([inc for c in canaries.values() for inc in c.included], dtype=bool)

    def _decisions(self, score: np.ndarray) -> AttackDecisions:
        frame = pd.DataFrame(
            {
                "target": [f"{n}[{i}]" for n, i in self.coordinates],
                "site": [s if inc else "" for s, inc in zip(self.sites, self.included)],
                "is_member": self.included,
                "predicted_member": score > np.median(score),
                "score": score,
            }
        )
        return AttackDecisions(attack=self.name, frame=frame, randomised=True, white_box=True)


class GradientCanaryAudit(_AllCanaries):
    """Callable attack: ``audit(model)`` scores every site's Dirac canaries against the start."""

    name = "gradient-canary"
    randomised = True  # inclusion is a fair coin per canary: the one-run bound applies

    def __init__(self, canaries: dict[str, DiracCanaries], *, reference: torch.nn.Module):
        super().__init__(canaries)
        self.start = coordinate_values(reference, self.coordinates)

    def __call__(self, model: torch.nn.Module) -> AttackDecisions:
        return self._decisions(self.start - coordinate_values(model, self.coordinates))


class GradientCanaryReplies(_AllCanaries):
    """The server's view: each site's canaries scored on that site's replies, summed over rounds.

    The strategy calls ``sent`` with the arrays of each round it sends and ``observe`` with each
    confirmed reply; ``decisions(round_)`` scores every canary by its site's total displacement so
    far. Only the canary coordinates are kept, never a reply. A resumed run starts the sums again
    (what it scores is then the rounds since the resume: a lower bound all the same)."""

    name = "gradient-canary-replies"
    randomised = True

    def __init__(self, canaries: dict[str, DiracCanaries]) -> None:
        super().__init__(canaries)
        self._rows = {site: np.array([k for k, s in enumerate(self.sites) if s == site]) for site in canaries}
        self._score = np.zeros(len(self.coordinates))
        self._sent: tuple[int, np.ndarray] | None = None
        self._replies = 0

    def _values(self, arrays: ArrayRecord, rows: np.ndarray) -> np.ndarray:
        flat = {name: arrays[name].numpy().reshape(-1) for name in {self.coordinates[k][0] for k in rows}}
        return np.array([float(flat[self.coordinates[k][0]][self.coordinates[k][1]]) for k in rows])

    def sent(self, round_: int, arrays: ArrayRecord) -> None:
        self._sent = (round_, self._values(arrays, np.arange(len(self.coordinates))))

    def observe(self, round_: int, site: str, arrays: ArrayRecord) -> None:
        rows = self._rows.get(site)
        if rows is None or not len(rows):
            return
        if self._sent is None or self._sent[0] != round_:
            raise ValueError(f"{self.name}: a reply of round {round_} from {site}, but not what was sent that round")
        self._score[rows] += self._sent[1][rows] - self._values(arrays, rows)
        self._replies += 1

    def decisions(self, round_: int) -> AttackDecisions | None:
        """Every canary's score so far (None before any reply was seen)."""
        if not self._replies:
            return None
        return self._decisions(self._score.copy())
