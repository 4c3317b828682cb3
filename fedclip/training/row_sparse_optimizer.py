"""Opacus' ``DPOptimizer``, taking a parameter's per-group gradients as rows when most rows are zero.

A group's gradient of the token embedding is zero outside the rows of the tokens its captions
contain. ``GroupGradients`` therefore hands that parameter's ``p.grad_sample`` over as [K, U, D]
for the U rows in ``p.grad_sample_rows`` (unique indices), instead of [K, 49408, D].

Why the mechanism is unchanged: the rows left out are zero in every group's gradient, so each
group's norm (what clipping uses) is the same over U rows as over all rows, and the clipped sum is
zero outside them. Opacus clips and sums as usual (its own ``clip_and_accumulate``); this class
only scatters the [U, D] clipped sum into a full-size [V, D] ``summed_grad`` before Opacus adds
noise, so the noise N(0, (sigma C)^2) still covers every coordinate of the parameter.
"""

from __future__ import annotations

from opacus.optimizers import DPOptimizer


class RowSparseDPOptimizer(DPOptimizer):
    """``DPOptimizer`` plus ``p.grad_sample_rows`` (None = a dense ``p.grad_sample``, as Opacus)."""

    def clip_and_accumulate(self) -> None:
        dense = {id(p): p.summed_grad for p in self.params}
        super().clip_and_accumulate()
        for p in self.params:
            rows = getattr(p, "grad_sample_rows", None)
            if rows is None:
                continue
            if dense[id(p)] is not None:
                raise ValueError("RowSparseDPOptimizer: row gradients cannot be accumulated over several batches")
            if rows.unique().numel() != rows.numel():
                raise ValueError("grad_sample_rows: row indices must be unique (the norm would be wrong)")
            clipped = p.summed_grad
            p.summed_grad = clipped.new_zeros(p.shape).index_add_(0, rows.to(clipped.device), clipped)

    def zero_grad(self, set_to_none: bool = False) -> None:
        super().zero_grad(set_to_none)
        for p in self.params:
            p.grad_sample_rows = None
