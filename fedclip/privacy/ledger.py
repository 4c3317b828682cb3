"""A site's privacy ledger: its events composed across rounds, and the prospective check.

The ledger is a value: ``record`` returns a new ledger, so a strategy can ask "what if this
site trains one more round?" (``epsilon_if``) without touching what has been spent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedclip.privacy.accountant import OPACUS_ACCOUNTANTS, check_delta, epsilon
from fedclip.privacy.events import DpEvent


@dataclass(frozen=True)
class PrivacyLedger:
    delta: float
    accountant: str = "prv"
    events: tuple[DpEvent, ...] = field(default=())

    def __post_init__(self) -> None:
        check_delta(self.delta)
        if self.accountant not in OPACUS_ACCOUNTANTS:
            raise ValueError(f"accountant: expected one of {OPACUS_ACCOUNTANTS}, got {self.accountant!r}")
        units = {e.privacy_unit for e in self.events}
        if len(units) > 1:
            raise ValueError(
                f"privacy_unit: a ledger composes events of one privacy unit, got {sorted(map(str, units))}; "
                "epsilons about records and about identities do not add up to a single guarantee"
            )

    def record(self, event: DpEvent) -> "PrivacyLedger":
        return PrivacyLedger(delta=self.delta, accountant=self.accountant, events=self.events + (event,))

    def record_all(self, events: "tuple[DpEvent, ...] | list[DpEvent]") -> "PrivacyLedger":
        return PrivacyLedger(delta=self.delta, accountant=self.accountant, events=self.events + tuple(events))

    def epsilon(self) -> float:
        return epsilon(self.events, delta=self.delta, accountant=self.accountant)

    def epsilon_if(self, event: DpEvent) -> float:
        """Epsilon after one more event, without recording it."""
        return self.record(event).epsilon()

    def would_exceed(self, event: DpEvent, *, budget: float) -> bool:
        return self.epsilon_if(event) > budget

    @property
    def steps(self) -> int:
        return sum(e.steps for e in self.events)
