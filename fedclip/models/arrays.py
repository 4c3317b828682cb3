"""Model parameters to and from Flower's ``ArrayRecord``.

Only what is trained needs to travel: with ``trainable_only`` a site sends the parameters it
updated, and the server keeps the frozen rest. Tensors are handed over detached, not cloned;
Flower serialises them once when the message is built, and loading copies them once into the
model's own storage.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord


def model_to_arrays(model: torch.nn.Module, *, trainable_only: bool = False) -> ArrayRecord:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {
        name: tensor.detach() for name, tensor in model.state_dict().items() if not trainable_only or name in trainable
    }
    return ArrayRecord(torch_state_dict=state, keep_input=False)


def load_arrays(model: torch.nn.Module, arrays: ArrayRecord) -> None:
    """Copy the arrays into the model; every array must name a parameter or buffer of it."""
    state = arrays.to_torch_state_dict()
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"arrays: {len(unknown)} array(s) the model does not have, e.g. {unknown[:3]}")
    for name, tensor in state.items():
        if own[name].shape != tensor.shape:
            raise ValueError(
                f"arrays: {name} has shape {tuple(tensor.shape)}, the model expects {tuple(own[name].shape)}"
            )
    model.load_state_dict(state, strict=False)
