"""The server as the adversary: an attack on each site's own update, not only on the average.

Why: under local DP the threat model's adversary is the server, and the server sees every site's
reply before it averages them. Averaging dilutes one site's name-to-face binding (a site's
update is one of S in the mean, and the other sites' updates overwrite much of it), so an
attack on the global model understates what the server can learn: the same identity inference
attack on a site's reply, a model trained on that site's patients alone in this round, names
several times as many of them (docs/results.md, "The attack's signal"). Local DP is what bounds this: each
reply is the output of the site's accounted mechanism, so the attack on it is post-processing
and the site's epsilon bounds it. Client-level DP at the server (Flower's server-side clipping)
does not: the server clips and noises after it has seen the raw replies, and this attack shows it.

The adversary does not know which site treats a person: a person is called a member if the
attack on *any* site's reply calls them one (the union over sites), and a non-member is a false
positive if any site's reply names them, so the false-positive rate is that of the whole
consortium's replies, not one site's.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import pandas as pd
import torch
from flwr.app import ArrayRecord

from fedclip.attacks.base import Attack, AttackDecisions
from fedclip.models.arrays import load_arrays

REPLY_ROUNDS = ("final", "every", "off")


class ReplyObserver(Protocol):
    """What the strategy shows each round's sent arrays and each confirmed reply to, and the
    evaluator asks for a round's decisions: ``ReplyAttack`` and the gradient canaries' server-side
    audit (``fedclip.attacks.gradient_canaries.GradientCanaryReplies``)."""

    name: str

    def sent(self, round_: int, arrays: ArrayRecord) -> None: ...

    def observe(self, round_: int, site: str, arrays: ArrayRecord) -> None: ...

    def decisions(self, round_: int) -> AttackDecisions | None: ...


def observe_each(
    observers: Sequence[ReplyObserver],
) -> tuple[Callable[[int, str, ArrayRecord], None], Callable[[int, ArrayRecord], None]]:
    """The strategy's ``on_reply`` and ``on_send`` for several observers: each observer is guarded
    on its own, so one that fails (logged) never keeps the others from seeing the arrays."""

    def each(call: Callable[[ReplyObserver], None], what: str) -> None:
        for observer in observers:
            try:
                call(observer)
            except Exception as exc:  # noqa: BLE001 - an audit's failure must not blind the others
                logging.getLogger("flwr").warning("%s failed on %s: %s", observer.name, what, exc)

    def on_reply(round_: int, site: str, arrays: ArrayRecord) -> None:
        each(lambda o: o.observe(round_, site, arrays), f"round {round_}'s reply from {site}")

    def on_send(round_: int, arrays: ArrayRecord) -> None:
        each(lambda o: o.sent(round_, arrays), f"round {round_}'s sent arrays")

    return on_reply, on_send


class ReplyAttack:
    """Runs ``attack`` on each site's reply of the rounds ``when`` selects, and unions the calls.

    The model for a reply is a private copy of ``model`` (the global model's architecture and
    frozen parameters) with the reply's arrays loaded: replies carry the trainable arrays only,
    and the frozen ones never change. Only the per-person decisions are kept, never the reply."""

    def __init__(self, attack: Attack, *, model: torch.nn.Module, when: Callable[[int], bool]) -> None:
        self.attack = attack
        self.name = f"{attack.name}-replies"
        self.when = when
        self._model = copy.deepcopy(model)
        self._calls: dict[int, dict[str, pd.DataFrame]] = {}

    def sent(self, round_: int, arrays: ArrayRecord) -> None:
        """The attack on a reply needs only the reply."""

    def observe(self, round_: int, site: str, arrays: ArrayRecord) -> None:
        """One site's confirmed reply of round ``round_`` (called by the strategy as it arrives)."""
        if not self.when(round_):
            return
        load_arrays(self._model, arrays)
        self._calls.setdefault(round_, {})[site] = self.attack(self._model).frame

    def decisions(self, round_: int) -> AttackDecisions | None:
        """The union over the round's replies (None if no reply of that round was attacked); each
        person's row also says which sites' replies named them (``named_by``)."""
        calls = self._calls.pop(round_, None)
        if not calls:
            return None
        for older in [r for r in self._calls if r < round_]:  # a round that never reached evaluation
            del self._calls[older]
        sites = sorted(calls)
        first = calls[sites[0]]
        for site in sites[1:]:
            if not calls[site]["target"].equals(first["target"]):
                raise ValueError(
                    f"{self.name}: the attack on {site}'s reply returned other targets than on {sites[0]}'s"
                )
        called = pd.DataFrame({site: calls[site]["predicted_member"].to_numpy(bool) for site in sites})
        frame = first[["target", "site", "is_member"]].copy()
        frame["predicted_member"] = called.any(axis=1).to_numpy()
        frame["named_by"] = called.apply(lambda row: ",".join(s for s in sites if row[s]), axis=1).to_numpy()
        if "score" in first.columns:
            frame["score"] = pd.DataFrame({s: calls[s]["score"].to_numpy(float) for s in sites}).max(axis=1).to_numpy()
        frame["replies"] = len(sites)
        return AttackDecisions(attack=self.name, frame=frame)


def reply_rounds(setting: str, *, total_rounds: int) -> Callable[[int], bool]:
    """Which rounds' replies to attack: ``final`` (the last round: one attack per site),
    ``every`` (every round: the attack's cost times the number of sites, each round) or ``off``."""
    if setting not in REPLY_ROUNDS:
        raise ValueError(f"attack-replies: expected one of {list(REPLY_ROUNDS)}, got {setting!r}")
    if setting == "every":
        return lambda round_: True
    if setting == "final":
        return lambda round_: round_ == total_rounds
    return lambda round_: False
