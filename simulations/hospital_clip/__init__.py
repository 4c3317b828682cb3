"""The hospital federation: each SuperNode is one hospital fine-tuning CLIP under per-batch DP."""

from simulations.hospital_clip.client_app import app as client_app
from simulations.hospital_clip.server_app import app as server_app
from simulations.hospital_clip.server_app import make_server_app

__all__ = ["client_app", "make_server_app", "server_app"]
