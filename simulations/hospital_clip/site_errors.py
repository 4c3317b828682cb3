"""What a site's failure tells the server: the rule or the phase, never a value computed from its data.

Under local DP the server is the adversary, and Flower relays the text of any exception a ClientApp
raises to the server (``str(exc)`` becomes the error reply's reason). An exception's text is written
for a person debugging the site: it names files, counts, the largest patient's number of images.
So the site's boundary (``site_rounds.handle``) sends only:

- a ``PolicyRefusal`` as it is: it names the rule and the plan's or policy's settings, which the
  server already knows (its limits in epsilon are computed from the site's ledger of the server's
  own plans, not from data);
- a ``SiteConfigError`` as it is: it names node-config keys, never their data-derived values;
- anything else as ``SiteFailed``: the site, the phase and an error id, and for a manifest's
  problem its places (``ManifestError.rows``: line, column and a fixed phrase, never a path, file
  name or value from the file), so the coordinator can say which row to fix. The detail (type,
  text, traceback) goes to the site's own ``errors.log`` in its state folder under the same id,
  never sent.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from pathlib import Path

from fedclip.data.manifest import ManifestError
from fedclip.privacy.policy import PolicyRefusal

log = logging.getLogger("fedclip.site")
ERRORS_LOG = "errors.log"


class SiteConfigError(ValueError):
    """A node config a site cannot run with; the text names keys only (public)."""


class SiteFailed(RuntimeError):
    """What the server is told of any other failure at a site."""


def is_public(exc: BaseException) -> bool:
    return isinstance(exc, (PolicyRefusal, SiteConfigError))


def note_locally(state_dir: Path, text: str) -> None:
    """Keep a detail the server must not see in the site's own ``errors.log``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ERRORS_LOG, "a") as f:
        f.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')}: {text}\n")


def redacted(exc: BaseException, *, site: str, phase: str, state_dir: Path | None) -> SiteFailed:
    """The error to send for ``exc``; its detail is kept in ``state_dir/errors.log`` (or this process' log)."""
    error_id = os.urandom(4).hex()
    detail = "".join(traceback.format_exception(exc))
    if state_dir is not None:
        try:
            note_locally(state_dir, f"error {error_id} while {phase}\n{detail}")
        except OSError:  # the state folder itself is the fault: keep the detail in this process' log
            state_dir = None
    if state_dir is None:
        log.error("error %s while %s:\n%s", error_id, phase, detail)
    where = "its state folder's errors.log" if state_dir is not None else "its process log"
    places = _manifest_places(exc)
    return SiteFailed(
        f"{site} failed while {phase} ({type(exc).__name__}, error {error_id})"
        + (f" at {places}" if places else "")
        + f"; the detail is in {where} at the site, never sent"
    )


def _manifest_places(exc: BaseException | None) -> str:
    """The manifest lines ``exc`` (or an exception it was raised from) points at, without values."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ManifestError) and exc.rows:
            return exc.places()
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return ""
