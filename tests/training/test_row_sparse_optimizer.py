import pytest
import torch
from opacus.optimizers import DPOptimizer

from fedclip.training.row_sparse_optimizer import RowSparseDPOptimizer


def _step(cls, grad_sample, rows=None):
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.zeros(50, 3))
    bias = torch.nn.Parameter(torch.zeros(3))
    opt = cls(
        torch.optim.SGD([table, bias], lr=1.0),
        noise_multiplier=0.7,
        max_grad_norm=0.5,
        expected_batch_size=4,
        generator=torch.Generator().manual_seed(3),
    )
    table.grad_sample, bias.grad_sample = grad_sample, torch.ones(4, 3)
    if rows is not None:
        table.grad_sample_rows = rows
    opt.step()
    return table.detach().clone(), bias.detach().clone()


def test_rows_give_exactly_the_dense_update_noise_included():
    """Same clipping (norms over the rows equal full norms), same noise on every coordinate of the
    table, including the 46 rows no group touched."""
    rows = torch.tensor([2, 7, 11, 40])
    compact = torch.randn(4, 4, 3, generator=torch.Generator().manual_seed(1))
    dense = torch.zeros(4, 50, 3).index_add_(1, rows, compact)
    sparse_table, sparse_bias = _step(RowSparseDPOptimizer, compact, rows)
    dense_table, dense_bias = _step(DPOptimizer, dense)
    torch.testing.assert_close(sparse_table, dense_table)
    torch.testing.assert_close(sparse_bias, dense_bias)
    assert (sparse_table != 0).all(), "rows outside the gradient's support still get noise"


def test_repeated_rows_are_refused():
    with pytest.raises(ValueError, match="unique"):
        _step(RowSparseDPOptimizer, torch.randn(4, 2, 3), torch.tensor([5, 5]))
