"""Units an auditor adds to a site's training, sampled and clipped like every unit.

Training must not depend on the attacks; an audit that inserts units (the gradient canaries of
``fedclip.attacks.gradient_canaries``) plugs in through this protocol. Every step the trainer asks
for the extra units, each Poisson-sampled at the step's rate from the trainer's own sampling
generator, and receives their per-sample gradient rows ({trainable parameter name: [n, *shape]},
each row of norm at most ``norm``), which it adds beside the data's groups before clipping; None
when none was sampled. Being units like the others, they are covered by the same accountant.
"""

from __future__ import annotations

from typing import Protocol

import torch


class ExtraUnits(Protocol):
    def sampled_rows(
        self, model: torch.nn.Module, *, rate: float, norm: float, generator: torch.Generator
    ) -> dict[str, torch.Tensor] | None: ...
