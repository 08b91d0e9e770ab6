"""``grid_sample`` (spatial transformers; Deformable DETR's multi-scale deformable attention in
plain PyTorch) that keeps its input packed and its grid exact. For a fixed grid the output is a
linear map of the input, so the input's gradient needs only the grid, and the grid's gradient
is linear in the input (unbiased with a packed input). PyTorch keeps the input whole."""

from __future__ import annotations

import torch

from actfx.variants.common import needs_saving, not_a_view, refuse_double_backward
from actfx.variants.saved import materialize_all, split_all

_BACKWARD = {4: torch.ops.aten.grid_sampler_2d_backward.default, 5: torch.ops.aten.grid_sampler_3d_backward.default}


class _GridSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, mode, padding, align_corners, grid, *run):
        x = run[0]
        out = torch.grid_sampler(x, grid, mode, padding, align_corners)
        plans, storage = split_all([spec], run) if ctx.needs_input_grad[4] else ([None], [])
        ctx.plans, ctx.args, ctx.like = plans, (mode, padding, align_corners), (x.shape, x.dtype)
        ctx.save_for_backward(grid, *storage)
        return not_a_view(out)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("grid_sample")
        grid, *storage = ctx.saved_tensors
        need_x, need_grid = ctx.needs_input_grad[5], ctx.needs_input_grad[4]
        shape, dtype = ctx.like
        # the input's values enter only the grid's gradient; without it any tensor of its shape serves
        x = materialize_all(ctx.plans, storage)[0].to(dtype) if need_grid else grad_out.new_zeros(shape, dtype=dtype)
        gx, ggrid = _BACKWARD[len(shape)](grad_out.contiguous(), x, grid, *ctx.args, [need_x, need_grid])
        return (None, None, None, None, ggrid if need_grid else None, gx if need_x else None) + (None,) * (
            len(ctx.needs_input_grad) - 6)


def grid_sample(spec, mode: int, padding: int, align_corners: bool, grid, *run):
    """``torch.grid_sampler`` (what ``F.grid_sample`` calls) with the input packed."""
    x = run[0]
    if not needs_saving(x, grid) or x.dim() not in _BACKWARD or not x.is_floating_point():
        return torch.grid_sampler(x, grid, mode, padding, align_corners)
    return _GridSample.apply(spec, mode, padding, align_corners, grid, *run)
