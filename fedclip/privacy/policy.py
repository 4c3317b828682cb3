"""A site's own privacy policy: what it agrees to run, whatever the server asks.

Under local DP the server is the adversary, so a site must not take its noise, its mode or its
budget from the server's word. A deployed site reads its policy from its node config
(``--node-config "allowed-dp-modes='microbatch' min-noise-multiplier=2.0 max-epsilon-total=8"``)
and refuses a round that breaks it, with an error that names the rule. In a simulation one
person plays every site, so the sites read their policies from a TOML file the run names
(``site-policy-file``: a ``[default]`` table and one table per site), or allow every mode.

``min-noise-multiplier`` is compared with sigma / sensitivity of every event that runs: paper mode
(sensitivity 2C) at sigma 4 has the effective noise of sigma 2 in the other modes, and is held to
the floor as such.

A deployed hospital that sets no cap is not left without one: its node config starts from
``DEPLOYED_DEFAULT`` (epsilon at most 10 for a run and in all, at delta 1e-5), the upper end of
what the DP literature calls meaningful; a key it sets replaces the default. Each site prints its
effective policy, saying which values are defaults, when a run starts (``describe``).

Epsilon limits are checked against the site's own durable ledger, at the policy's ``delta``
(not the server's), *before* the site trains: "would this round, as planned, take me past my
limit?". In dp-mode distributed the ledger charges the epsilon against the adversary the policy
names (``distributed-adversary``: ``server``, ``colluding`` or ``own-share``), so the caps bound
that figure.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedclip.distributed.adversaries import ADVERSARIES
from fedclip.privacy.accountant import check_delta
from fedclip.privacy.events import DpEvent
from fedclip.privacy.ledger import PrivacyLedger
from fedclip.privacy.modes import DP_MODES

POLICY_KEYS = (
    "allowed-dp-modes",
    "min-noise-multiplier",
    "max-epsilon-run",
    "max-epsilon-total",
    "delta",
    "distributed-adversary",
)
REFUSAL = "site policy refuses the round"


class PolicyRefusal(ValueError):
    """A round the site's policy forbids; the message names the rule (and reaches the server)."""

    def __init__(self, site: str, rule: str, detail: str) -> None:
        self.site, self.rule = site, rule
        super().__init__(f"{REFUSAL} at {site}: {rule}: {detail}")


@dataclass(frozen=True, kw_only=True)
class SitePolicy:
    allowed_dp_modes: tuple[str, ...] = ("microbatch", "unit", "paper")
    min_noise_multiplier: float = 0.0
    max_epsilon_run: float = math.inf
    max_epsilon_total: float = math.inf
    delta: float = 1e-5
    allow_reproducible_noise: bool = False
    # dp-mode distributed: whom the site's ledger and caps count against (fedclip.distributed.adversaries):
    # the server alone, the server with colluding sites, or nobody trusted (its own noise share only)
    distributed_adversary: str = "server"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.allowed_dp_modes) - set(DP_MODES))
        if unknown or not self.allowed_dp_modes:
            raise ValueError(f"allowed-dp-modes: expected some of {DP_MODES}, got {list(self.allowed_dp_modes)}")
        if not (self.min_noise_multiplier >= 0 and math.isfinite(self.min_noise_multiplier)):
            raise ValueError(f"min-noise-multiplier: expected a finite value >= 0, got {self.min_noise_multiplier}")
        for name in ("max_epsilon_run", "max_epsilon_total"):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"{name.replace('_', '-')}: expected an epsilon > 0 (or inf), got {getattr(self, name)}"
                )
        check_delta(self.delta)
        if self.distributed_adversary not in ADVERSARIES:
            raise ValueError(
                f"distributed-adversary: expected one of {list(ADVERSARIES)}, got {self.distributed_adversary!r}"
            )

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], *, source: str, defaults: "SitePolicy | None" = None
    ) -> "SitePolicy":
        """Parse the policy keys of a node config or a policy-file table; other keys are ignored."""
        base = defaults or cls()
        kwargs: dict[str, Any] = {}
        try:
            if "allowed-dp-modes" in values:
                raw = values["allowed-dp-modes"]
                items = raw if isinstance(raw, (list, tuple)) else str(raw).replace("|", ",").split(",")
                kwargs["allowed_dp_modes"] = tuple(s.strip() for s in items if str(s).strip())
            for key in ("min-noise-multiplier", "max-epsilon-run", "max-epsilon-total", "delta"):
                if key in values:
                    kwargs[key.replace("-", "_")] = float(values[key])
            if "distributed-adversary" in values:
                kwargs["distributed_adversary"] = str(values["distributed-adversary"])
            return cls(**{**base.__dict__, **kwargs})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: site policy: {exc}") from exc

    def describe(self, *, site: str, given: Mapping[str, Any]) -> str:
        """One line for the site's log: every rule, each marked default unless ``given`` set it."""
        values = {
            "allowed-dp-modes": ",".join(self.allowed_dp_modes),
            "min-noise-multiplier": f"{self.min_noise_multiplier:g}",
            "max-epsilon-run": f"{self.max_epsilon_run:g}",
            "max-epsilon-total": f"{self.max_epsilon_total:g}",
            "delta": f"{self.delta:g}",
            "distributed-adversary": self.distributed_adversary,
        }
        rules = " ".join(f"{k}={v}{'' if k in given else ' (default)'}" for k, v in values.items())
        return f"{site}'s privacy policy: {rules}"

    @classmethod
    def simulated(cls, delta: float) -> "SitePolicy":
        """A simulated site without a policy file: one person plays every party, any mode runs."""
        return cls(allowed_dp_modes=DP_MODES, delta=delta, allow_reproducible_noise=True)

    def check(
        self,
        *,
        site: str,
        mode: str,
        events: Sequence[DpEvent],
        reproducible: bool,
        total: PrivacyLedger,
        this_run: PrivacyLedger,
    ) -> None:
        """Raise ``PolicyRefusal`` naming the first rule the planned round breaks."""
        if mode not in self.allowed_dp_modes:
            raise PolicyRefusal(
                site, "allowed-dp-modes", f"dp-mode {mode!r} is not one of {list(self.allowed_dp_modes)}"
            )
        if reproducible and not self.allow_reproducible_noise:
            raise PolicyRefusal(
                site,
                "reproducible-noise",
                "seeded noise is not private against the server; "
                "a deployed site always draws its noise from the operating system",
            )
        trained = [e for e in events if e.steps > 0]
        if mode != "nonprivate":  # the floor is on the noise per unit of sensitivity: paper mode's sigma counts half
            low = min((e.noise_multiplier / e.sensitivity for e in trained), default=math.inf)
            if low < self.min_noise_multiplier:
                raise PolicyRefusal(
                    site,
                    "min-noise-multiplier",
                    f"noise multiplier {low:.4g} (sigma / sensitivity) is below this site's floor "
                    f"{self.min_noise_multiplier:.4g}",
                )
        for rule, ledger, limit in (
            ("max-epsilon-run", this_run, self.max_epsilon_run),
            ("max-epsilon-total", total, self.max_epsilon_total),
        ):
            if math.isinf(limit):
                continue
            spent = ledger.record_all(events).epsilon()
            if spent > limit:
                raise PolicyRefusal(
                    site,
                    rule,
                    f"this round would bring epsilon to {spent:.4g} (delta {self.delta:g}), "
                    f"above the limit {limit:.4g}",
                )


DEPLOYED_DEFAULT = SitePolicy(max_epsilon_run=10.0, max_epsilon_total=10.0)


def load_policy_file(path: str | Path, *, delta: float) -> dict[str, SitePolicy]:
    """``{site: policy}`` from a TOML file; ``"*"`` holds the ``[default]`` table's policy."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"site-policy-file: {path}: not a readable TOML file: {exc}") from exc
    base = SitePolicy.simulated(delta)
    default = SitePolicy.from_mapping(data.get("default", {}), source=f"{path} [default]", defaults=base)
    out = {"*": default}
    for site, table in data.items():
        if site == "default":
            continue
        if not isinstance(table, dict):
            raise ValueError(f"site-policy-file: {path}: [{site}] must be a table of {POLICY_KEYS}")
        unknown = sorted(set(table) - set(POLICY_KEYS))
        if unknown:
            raise ValueError(f"site-policy-file: {path} [{site}]: unknown key(s) {unknown}; known: {list(POLICY_KEYS)}")
        out[site] = SitePolicy.from_mapping(table, source=f"{path} [{site}]", defaults=default)
    return out
