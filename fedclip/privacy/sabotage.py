"""A deliberately broken mechanism, for the auditor's self-test only.

``FEDCLIP_SABOTAGE_NOISE_DIVISOR=10`` makes every DP optimizer add a tenth of the noise while the
privacy event (and so every ledger and every printed epsilon) still records the intended noise:
the platform then lies about its privacy, and the canary audit must catch it (its lower bound
above the printed epsilon). Inert unless the variable is set; when set, every training run says
so on stderr. Like ``strategies.faults``, it exists so that a test can prove a safeguard works.
"""

from __future__ import annotations

import os
import sys

VARIABLE = "FEDCLIP_SABOTAGE_NOISE_DIVISOR"


def noise_divisor() -> float:
    value = os.environ.get(VARIABLE, "")
    if not value:
        return 1.0
    try:
        divisor = float(value)
    except ValueError:
        raise ValueError(f"{VARIABLE}: expected a number >= 1, got {value!r}") from None
    if not divisor >= 1:
        raise ValueError(f"{VARIABLE}: expected a number >= 1, got {value!r}")
    if divisor > 1:
        print(
            f"SABOTAGE ({VARIABLE}={value}): this site adds 1/{divisor:g} of the noise its ledger records; every "
            "epsilon printed for it is false (auditor self-test only)",
            file=sys.stderr,
            flush=True,
        )
    return divisor
