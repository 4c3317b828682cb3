"""Fault injection: die at a named phase of a round, as a killed server would.

``FEDCLIP_CRASH_AT="charged:2"`` makes the process exit at once (``os._exit``: no cleanup, no
flush, no ``finally``) when round 2 reaches the phase ``charged``. Inert unless that variable is
set; the fault-injection tests use it to prove that a resume never under-counts spending. The
phases of a round, in order:

- ``charged``: the planned events of the selected sites are committed, nothing is sent;
- ``sent``: the train messages are out, no reply was handled (sites may have trained);
- ``replied``: every reply is in the server's memory, none is settled in the ledger;
- ``settled``: every charge is settled, the inner strategy has not aggregated;
- ``aggregated``: the new global model exists in memory only;
- ``saved``: the global model and the round's tables are on disk.

And at a site (the process that trains: a ClientApp, or a site's worker):

- ``site-charged``: the site's own ledger holds the round's charge, no data was read;
- ``site-trained``: the update exists in memory, the charge is not settled;
- ``site-settled``: the charge is settled and the spending files written, no reply was sent.

``FEDCLIP_RAISE_AT="aggregated:2"`` raises ``InjectedFault`` there instead: an exception, as a bug
would raise, which the run's ``finally`` must turn into a ``failed`` status. It also knows
``report`` (the run's closing report, after the last round), and ``fedclip tune``'s
``search-charged`` (the search's state and charges are on disk, no candidate has started).

``FEDCLIP_PAUSE_AT="site-charged"`` (every round; or ``:N``) sleeps ``FEDCLIP_PAUSE_SECONDS``
(default 3) there: a window in which a test kills another party mid-round, however fast the
round would otherwise be.
"""

from __future__ import annotations

import os
import sys
import time

PHASES = ("charged", "sent", "replied", "settled", "aggregated", "saved")
SITE_PHASES = ("site-charged", "site-trained", "site-settled")
CRASH_EXIT_CODE = 86
REPORT_PHASE = "report"
SEARCH_PHASE = "search-charged"  # fedclip tune: every site charged for the search, no candidate started


class InjectedFault(RuntimeError):
    """The exception ``FEDCLIP_RAISE_AT`` raises."""


def crash_point(phase: str, round_: int) -> None:
    for variable in ("FEDCLIP_CRASH_AT", "FEDCLIP_RAISE_AT", "FEDCLIP_PAUSE_AT"):
        target = os.environ.get(variable, "")
        if not target:
            continue
        name, _, at = target.partition(":")
        known = PHASES + SITE_PHASES + (REPORT_PHASE, SEARCH_PHASE)
        if name not in known:
            raise ValueError(f"{variable}: unknown phase {name!r}; expected one of {known}")
        if name != phase or (at and int(at) != round_):
            continue
        if variable == "FEDCLIP_PAUSE_AT":
            time.sleep(float(os.environ.get("FEDCLIP_PAUSE_SECONDS", "3")))
            continue
        if variable == "FEDCLIP_RAISE_AT":
            raise InjectedFault(f"fault injection: an exception at phase {phase!r} of round {round_}")
        print(f"fault injection: crashing at phase {phase!r} of round {round_}", file=sys.stderr, flush=True)
        os._exit(CRASH_EXIT_CODE)
