"""Flower apps that run fedclip federations (``flower-simulation --app simulations.hospital_clip``)."""
