"""The server's step of the distributed rounds: a resumed run keeps the optimizer's moments."""

import copy

import pytest
import torch

from fedclip.models.arrays import model_to_arrays
from strategies.distributed import ServerStep


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].bias.requires_grad_(False)  # a frozen parameter: not in the flat gradient
    return model


def _gradients(n: int) -> list[torch.Tensor]:
    dim = sum(p.numel() for p in _model().parameters() if p.requires_grad)
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(dim, generator=generator) for _ in range(n)]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_a_step_restored_from_its_state_continues_as_if_never_stopped(optimizer):
    grads = _gradients(4)
    whole = ServerStep(_model(), lr=0.1, optimizer=optimizer)
    arrays = model_to_arrays(whole.model, trainable_only=True)
    for g in grads:
        arrays = whole(arrays, g)

    first = ServerStep(_model(), lr=0.1, optimizer=optimizer)
    halfway = model_to_arrays(first.model, trainable_only=True)
    for g in grads[:2]:
        halfway = first(halfway, g)
    saved = copy.deepcopy(first.state_dict())
    resumed = ServerStep(_model(), lr=0.1, optimizer=optimizer, state=saved)
    fresh = ServerStep(_model(), lr=0.1, optimizer=optimizer)  # what a resume without the state did
    restarted, again = halfway, halfway
    for g in grads[2:]:
        restarted, again = resumed(restarted, g), fresh(again, g)

    for name, value in arrays.to_torch_state_dict().items():
        torch.testing.assert_close(restarted.to_torch_state_dict()[name], value)
    assert any(not torch.allclose(again.to_torch_state_dict()[n], v) for n, v in arrays.to_torch_state_dict().items())
