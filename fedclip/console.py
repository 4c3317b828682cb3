"""What the console shows: known third-party warnings silenced by exact text, nothing else.

Each entry is a warning fedclip triggers knowingly and cannot act on; its text is matched from
the start, so a new or changed warning from the same library still shows. ``PYTHONWARNINGS`` carries
the filters into every process a run starts (Ray's actors, a site worker, a ClientApp process).
"""

from __future__ import annotations

import builtins
import logging
import os
import warnings

KNOWN_WARNINGS: tuple[tuple[str, str], ...] = (
    # torch.func.vmap on CPU attention (per-micro-batch gradients; issue 13 replaces vmap)
    ("UserWarning", "There is a performance drop because we have not yet implemented the batching rule"),
    # Opacus' RDP calibration reaching its largest order: the bound is still an upper bound
    ("UserWarning", "Optimal order is the largest alpha"),
)
KNOWN_LOG_LINES: tuple[str, ...] = (
    "DEPRECATED FEATURE: The `run_simulation` function is deprecated",  # flower-simulation uses it on purpose
    "fraction_evaluate is set to 0.0",  # the server evaluates the global model itself
    # open_clip, before fedclip loads its own checkpoint into the model (a failed load raises)
    "No pretrained weights loaded for model 'fedclip-",
)


def _pythonwarnings() -> str:
    return ",".join(f"ignore:{text}:{category}" for category, text in KNOWN_WARNINGS)


class _KnownLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(line in message for line in KNOWN_LOG_LINES)


def quiet_known_noise() -> None:
    """Install the filters here and, through the environment, in every process started after."""
    for category, text in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=text, category=getattr(builtins, category))
    existing = [f for f in os.environ.get("PYTHONWARNINGS", "").split(",") if f]
    os.environ["PYTHONWARNINGS"] = ",".join(existing + [f for f in _pythonwarnings().split(",") if f not in existing])
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's own fix for its FutureWarning tip
    for logger in (logging.getLogger("flwr"), logging.getLogger()):  # Flower's logger; open_clip logs on the root
        if not any(isinstance(f, _KnownLines) for f in logger.filters):
            logger.addFilter(_KnownLines())
