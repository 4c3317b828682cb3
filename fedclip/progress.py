"""Progress bars where someone is watching, and nothing in logs and pipes.

``FEDCLIP_PROGRESS``: ``1`` shows bars, ``0`` hides them, unset shows them when stderr is a
terminal. The command that starts a run (``flower-simulation``, ``fedclip``) resolves this once
with ``decide_progress()`` and writes the answer into the environment, so Ray's actors and other
child processes (whose stderr is never a terminal) follow the terminal the user is looking at.

Inside a process where Ray is running (a simulation's driver or its actors) the bars are Ray's
``tqdm_ray``: each actor sends its bar's state to the driver, which draws all of them without
overwriting each other. Elsewhere (a deployed SuperNode's ClientApp, the CLI) plain ``tqdm``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

ENV = "FEDCLIP_PROGRESS"


def decide_progress() -> bool:
    """Resolve ``FEDCLIP_PROGRESS`` for this run and export it to every process started after."""
    value = os.environ.get(ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{ENV}: expected 0, 1 or unset, got {value!r}")
    show = progress_enabled()
    os.environ[ENV] = "1" if show else "0"
    return show


def progress_enabled() -> bool:
    """Bars on: ``FEDCLIP_PROGRESS=1``, or unset and stderr a terminal."""
    value = os.environ.get(ENV, "").strip()
    return value == "1" or (value == "" and sys.stderr.isatty())


class _Silent:
    """What a hidden bar is: it counts, and shows nothing."""

    def __init__(self, total: int) -> None:
        self.total, self.n = total, 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        pass


def _in_ray() -> bool:
    if "ray" not in sys.modules:  # never import Ray just to ask (a deployed ClientApp has no Ray)
        return False
    import ray

    return ray.is_initialized()


def progress_bar(*, total: int, desc: str, unit: str = "step", leave: bool = False) -> Any:
    """A bar with ``update(n)`` and ``close()`` (what Ray's and tqdm's bars both have)."""
    if not progress_enabled():
        return _Silent(total)
    if _in_ray():
        from ray.experimental import tqdm_ray

        return tqdm_ray.tqdm(total=total, desc=desc, unit=unit)
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, dynamic_ncols=True)


def say(line: str) -> None:
    """Print a line above any bar on this terminal (tqdm's ``write``), else plainly."""
    if progress_enabled() and not _in_ray():
        from tqdm import tqdm

        tqdm.write(line)
        sys.stdout.flush()
    else:
        print(line, flush=True)
