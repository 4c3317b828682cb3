"""The hospital federation: each SuperNode is one hospital fine-tuning CLIP under per-batch DP."""

import logging

from simulations.hospital_clip.client_app import app as client_app

# Flower logs through its own console handler. Opacus (on import) and open_clip (its first
# logging.warning) give the root logger a handler too, and every Flower line was printed twice.
# Flower's records now stop at Flower's handler; other libraries' log lines still reach the root.
logging.getLogger("flwr").propagate = False

__all__ = ["client_app", "make_server_app"]  # the ServerApp object: simulations.hospital_clip.server_app:app


def __getattr__(name: str):
    """``make_server_app`` on first use: a deployed site's ClientApp, started afresh for every
    message, imports this package and should not pay for the server's imports (torch, Opacus)."""
    if name == "make_server_app":
        from importlib import import_module

        return import_module("simulations.hospital_clip.server_app").make_server_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
