"""The hospital federation: each SuperNode is one hospital fine-tuning CLIP under per-batch DP."""

import logging

from simulations.hospital_clip.client_app import app as client_app
from simulations.hospital_clip.server_app import app as server_app
from simulations.hospital_clip.server_app import make_server_app

# Flower logs through its own console handler. Opacus (on import) and open_clip (its first
# logging.warning) give the root logger a handler too, and every Flower line was printed twice.
# Flower's records now stop at Flower's handler; other libraries' log lines still reach the root.
logging.getLogger("flwr").propagate = False

__all__ = ["client_app", "make_server_app", "server_app"]
