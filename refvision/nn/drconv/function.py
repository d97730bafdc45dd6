"""The region conv as an autograd Function (hard mask forward, the paper's softmax rule backward),
the functional ``drconv2d``, and the Function's FLOP handle."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.nn.common_types import _size_2_t
from torch.nn.modules.utils import _pair

from refvision.nn.drconv.geometry import Pair
from refvision.nn.drconv.layouts import Needs, RegionLayout, region_conv_macs, region_layout


class RegionConvFunction(torch.autograd.Function):
    """Hard-mask region conv with the paper's softmax gradient for the guide.

    ``out[b, :, p] = filters[b, r(b, p)] * patch(b, p) + bias`` with ``r = argmax_j guide``; see
    :func:`drconv2d`. Saves ``x``, ``filters``, ``guide`` and the row layout (index vectors); the
    input patches are gathered again in backward, as a conv would re-read its input.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        filters: Tensor,
        bias: Tensor | None,
        guide: Tensor,
        stride: Pair,
        padding: Pair,
        dilation: Pair,
    ) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            layout = region_layout(guide)
            out = _layout_conv(x, filters, bias, layout, stride, padding, dilation)
        ctx.save_for_backward(x, filters, guide)
        ctx.layout = layout
        ctx.geometry = (stride, padding, dilation)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, filters, guide = ctx.saved_tensors
        layout: RegionLayout = ctx.layout
        need_x, need_filters, need_bias, need_guide = ctx.needs_input_grad[:4]
        grad_bias = grad_guide = grad_filters = None
        with torch.autocast(x.device.type, enabled=False):
            patches = layout.patches(x.shape, filters.shape[-2:], *ctx.geometry)
            grad_rows = grad_out.permute(0, 2, 3, 1).reshape(-1, grad_out.shape[1])
            needs = Needs(need_x, need_filters, need_guide)
            grad_x, summed, responses = layout.backward(patches, x, group_filters(filters), grad_rows, needs)
            if need_bias:
                grad_bias = grad_out.sum((0, 2, 3))
            if need_filters:
                grad_filters = _ungroup_filters(summed, filters.shape)
            if need_guide:
                soft = torch.softmax(guide, dim=1)
                grad_guide = soft * (responses - (soft * responses).sum(1, keepdim=True))
        return grad_x, grad_filters, grad_bias, grad_guide, None, None, None


REGION_CONV_OP = f"prim::PythonOp.{RegionConvFunction.__name__}"
"""How :class:`RegionConvFunction` appears in a traced graph (what a FLOP analyzer sees)."""


def region_conv_flops(inputs: list[Any], outputs: list[Any]) -> int:
    """FLOP handle of :data:`REGION_CONV_OP`: the multiply-adds of the tiled GEMMs
    (:func:`~refvision.nn.drconv.layouts.region_conv_macs`). ``inputs`` are the traced op's tensor
    inputs ``x, filters (B, m, Cout, Cin, kh, kw), [bias,] guide (B, m, Ho, Wo)``."""
    filters, guide = (value.type().sizes() for value in (inputs[1], inputs[-1]))
    batch, regions, cout, cin, kh, kw = filters
    return region_conv_macs(batch, regions, (guide[2], guide[3]), cout, cin * kh * kw)


def region_conv(
    x: Tensor,
    filters: Tensor,
    bias: Tensor | None,
    guide: Tensor,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
) -> Tensor:
    """The region conv without the autograd Function (the deploy form's): its ops are those of the
    layout :func:`~refvision.nn.drconv.layouts.region_layout` picks, traceable and exportable.
    Shapes as :func:`drconv2d`, ``filters`` folded as for :func:`region_conv2d`."""
    return _layout_conv(x, filters, bias, region_layout(guide), stride, padding, dilation)


def _layout_conv(
    x: Tensor,
    filters: Tensor,
    bias: Tensor | None,
    layout: RegionLayout,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
) -> Tensor:
    """Forward of the region conv. Shapes as :func:`drconv2d`, output as :meth:`RegionLayout.rows_to_output`."""
    patches = layout.patches(x.shape, filters.shape[-2:], stride, padding, dilation)
    return layout.conv(patches, x, group_filters(filters), bias)


def group_filters(filters: Tensor) -> Tensor:
    """``(B, m, Cout, Cin, kh, kw)`` -> ``(m*B, Cout, kh*kw*Cin)``: group ``j*B + b``, patch row order."""
    batch, regions, cout = filters.shape[:3]
    return filters.transpose(0, 1).movedim(3, -1).reshape(regions * batch, cout, math.prod(filters.shape[3:]))


def _ungroup_filters(grouped: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`group_filters`, to ``shape`` ``(B, m, Cout, Cin, kh, kw)``."""
    batch, regions, cout, cin, kh, kw = shape
    return grouped.view(regions, batch, cout, kh, kw, cin).permute(1, 0, 2, 5, 3, 4)


def drconv2d(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    dynamic: Tensor,
    guide: Tensor,
    stride: _size_2_t = 1,
    padding: _size_2_t = 0,
    dilation: _size_2_t = 1,
) -> Tensor:
    """Region-aware conv with a hard mask and the paper's softmax gradient for the guide.

    Args:
        x: input ``(B, Cin, H, W)``; ``padding`` is symmetric zero padding (pad other modes
            beforehand and pass ``padding=0``).
        weight: static kernel ``(Cout, Cin, kh, kw)`` added to every region filter, or None
            (the paper's layer); bias: ``(Cout,)`` or None.
        dynamic: per-sample region filters ``(B, m, Cout, Cin, kh, kw)``; region ``j`` of
            sample ``b`` uses ``weight + dynamic[b, j]`` (``dynamic[b, j]`` without ``weight``).
        guide: guide logits ``(B, m, Ho, Wo)`` on the output grid; pixel ``p`` belongs to
            ``argmax_j guide[b, j, p]``.

    Returns:
        ``(B, Cout, Ho, Wo)`` (channels-last strides, storage of its own: in-place ops may
        follow). Differentiable wrt every tensor argument (once). Under autocast for ``x``'s
        device every input is cast to float32 and the result is float32.
    """
    filters = dynamic if weight is None else weight + dynamic
    return region_conv2d(x, filters, bias, guide, stride, padding, dilation)


def region_conv2d(
    x: Tensor,
    filters: Tensor,
    bias: Tensor | None,
    guide: Tensor,
    stride: _size_2_t,
    padding: _size_2_t,
    dilation: _size_2_t,
) -> Tensor:
    """:func:`drconv2d` with the filters already folded, ``(B, m, Cout, Cin, kh, kw)``."""
    if torch.is_autocast_enabled(x.device.type):
        x, filters, guide = x.float(), filters.float(), guide.float()
        bias = None if bias is None else bias.float()
    return RegionConvFunction.apply(x, filters, bias, guide, _pair(stride), _pair(padding), _pair(dilation))
