"""DRConv: dynamic region-aware convolution (Chen et al., CVPR 2021, arXiv 2003.12243).

A learned *guide* conv splits the output plane into ``m`` regions (per-pixel argmax), and
every region gets its own input-dependent filter; each output pixel is computed with the
one filter of its region.

Choices made here (see METHODS.md for what the paper and the official code do):

* **Filter generator: the paper's**, ``AdaptiveAvgPool2d((kh, kw))`` -> 1x1 conv
  ``Cin -> m^2`` -> sigmoid -> grouped 1x1 conv ``m^2 -> m*Cout*Cin`` (``m`` groups) ->
  ``m`` filters of ``Cout x Cin x kh x kw`` per sample (not the official code's
  CondConv-style mixture of basis kernels). It is written as *static kernel + dynamic
  residual*: region ``j``'s filter for sample ``b`` is ``W_j(b) = weight + D_j(b)``, where
  ``weight``/``bias`` are the ordinary ``nn.Conv2d`` parameters and ``D`` is the
  generator's output.
* **Function preservation.** The generator's last conv is zero-initialized, so ``D = 0``
  at step 0, every region filter equals ``weight``, and ``DRConv.from_conv(conv)`` returns
  exactly ``conv``'s outputs (the static part is computed by the very ``F.conv2d`` call
  ``nn.Conv2d`` makes, and the dynamic part adds exact zeros). The first optimizer step
  makes ``D`` non-zero. Because every region shares the same filter while ``D = 0``, the
  guide receives zero gradient on that first step and starts learning from the second.
* **Backward through the argmax (paper's rule).** The forward pass uses the hard one-hot
  mask; with ``S = softmax(F)`` over regions and ``g_j = sum_c dL/dY_c * Y^(j)_c``, the guide
  logits get ``dL/dF = S * (g - sum_j S_j g_j)``. Region ``j``'s filter only receives
  gradient from pixels assigned to ``j``.
* **Cost.** Forward: one dense conv with the shared kernel plus, for the residuals, one
  conv's worth of GEMMs (pixels are sorted by (sample, region) and each group of columns
  is multiplied by its own residual only). Backward: one conv's worth of GEMMs for the input
  gradient and one for the filter gradients; the guide gradient needs every region's
  response at every pixel (inherent to the rule), computed region by region with ``bmm``
  so extra memory stays ``O(B * Cout * Ho * Wo)``, for ``m`` convs' worth of FLOPs.
  The generator's output holds ``B * m * Cout * Cin * kh * kw`` numbers (and its last
  layer ``m^2 * Cout * Cin`` weights), the price of the paper's generator.
* **Mixed precision.** Under ``torch.autocast`` the guide and generator run in reduced
  precision like any conv; the region conv itself casts its inputs to float32 and runs
  with autocast disabled (forward and backward), returning float32.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.nn.common_types import _size_2_t
from torch.nn.modules.utils import _pair

__all__ = ["DRConv", "DRConvDeploy", "RegionFilterGenerator", "drconv2d"]

Pair = tuple[int, int]


class RegionFilterGenerator(nn.Module):
    """The paper's filter generator: ``m`` dynamic filters per sample.

    ``AdaptiveAvgPool2d((kh, kw))`` -> 1x1 conv ``Cin -> m^2`` -> sigmoid -> grouped 1x1 conv
    ``m^2 -> m*Cout*Cin`` with ``m`` groups (group ``j`` makes region ``j``'s filter).
    Weights are plain parameters applied with ``F.conv2d`` (no ``nn.Conv2d`` children, so
    model walkers that rewrite every ``nn.Conv2d`` leave them alone). The expand layer is
    zero-initialized: the generator outputs zeros until trained.

    Input ``(B, Cin, H, W)``; output ``(B, m, Cout, Cin, kh, kw)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t,
        regions: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size: Pair = _pair(kernel_size)
        self.regions = regions
        hidden = regions * regions
        self.reduce_weight = nn.Parameter(torch.empty(hidden, in_channels, 1, 1, **factory))
        self.reduce_bias = nn.Parameter(torch.empty(hidden, **factory))
        expanded = regions * out_channels * in_channels
        self.expand_weight = nn.Parameter(torch.empty(expanded, regions, 1, 1, **factory))
        self.expand_bias = nn.Parameter(torch.empty(expanded, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _default_conv_init(self.reduce_weight, self.reduce_bias)
        nn.init.zeros_(self.expand_weight)
        nn.init.zeros_(self.expand_bias)

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.adaptive_avg_pool2d(x, self.kernel_size)
        hidden = torch.sigmoid(F.conv2d(pooled, self.reduce_weight, self.reduce_bias))
        filters = F.conv2d(hidden, self.expand_weight, self.expand_bias, groups=self.regions)
        kh, kw = self.kernel_size
        return filters.view(x.shape[0], self.regions, self.out_channels, self.in_channels, kh, kw)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"regions={self.regions}"
        )


class _RegionConvFunction(torch.autograd.Function):
    """Hard-mask region conv with the paper's softmax gradient for the guide.

    ``out = conv(x, weight, bias) + D_{r(b,p)}(b) * x_col(b, p)`` with
    ``r(b, p) = argmax_j guide[b, j, p]``. See :func:`drconv2d` for shapes.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        dynamic: Tensor,
        guide: Tensor,
        stride: Pair,
        padding: Pair,
        dilation: Pair,
    ) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            out = F.conv2d(x, weight, bias, stride, padding, dilation)
            batch, out_channels, out_h, out_w = out.shape
            kernel_size = weight.shape[-2:]
            cols = F.unfold(x, kernel_size, dilation, padding, stride)
            order = _RegionOrder(guide)
            rows = order.gather(cols)
            residuals = dynamic.reshape(order.segments, out_channels, -1)
            out_rows = rows.new_empty(rows.shape[0], out_channels)
            for segment, part in order.parts():
                torch.mm(rows[part], residuals[segment].t(), out=out_rows[part])
            residual_out = out_rows.new_empty(batch, out_channels, out_h * out_w)
            order.scatter(residual_out, out_rows)
            out = out + residual_out.view(batch, out_channels, out_h, out_w)
        ctx.save_for_backward(x, weight, dynamic, guide)
        ctx.geometry = (stride, padding, dilation)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, dynamic, guide = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        need_x, need_weight, need_bias, need_dynamic, need_guide = ctx.needs_input_grad[:5]
        grad_x = grad_weight = grad_bias = grad_dynamic = grad_guide = None
        with torch.autocast(x.device.type, enabled=False):
            batch, out_channels, out_h, out_w = grad_out.shape
            kernel_size = weight.shape[-2:]
            regions = guide.shape[1]
            grad_flat = grad_out.reshape(batch, out_channels, out_h * out_w)
            cols = F.unfold(x, kernel_size, dilation, padding, stride)
            order = _RegionOrder(guide)
            grad_rows = order.gather(grad_flat)

            if need_x:
                filters = weight.reshape(1, out_channels, -1) + dynamic.reshape(
                    order.segments, out_channels, -1
                )
                grad_col_rows = grad_rows.new_empty(grad_rows.shape[0], cols.shape[1])
                for segment, part in order.parts():
                    torch.mm(grad_rows[part], filters[segment], out=grad_col_rows[part])
                grad_cols = torch.empty_like(cols)
                order.scatter(grad_cols, grad_col_rows)
                grad_x = F.fold(grad_cols, x.shape[-2:], kernel_size, dilation, padding, stride)

            if need_weight or need_dynamic:
                rows = order.gather(cols)
                grad_filters = rows.new_zeros(order.segments, out_channels, cols.shape[1])
                for segment, part in order.parts():
                    torch.mm(grad_rows[part].t(), rows[part], out=grad_filters[segment])
                if need_weight:
                    grad_weight = grad_filters.sum(0).view_as(weight)
                if need_dynamic:
                    grad_dynamic = grad_filters.view_as(dynamic)

            if need_bias:
                grad_bias = grad_out.sum((0, 2, 3))

            if need_guide:
                # The shared kernel and bias add the same amount to every g_j, which cancels
                # in g - sum_j S_j g_j, so only the residuals enter g.
                g = grad_flat.new_empty(batch, regions, out_h * out_w)
                for j in range(regions):
                    response = torch.bmm(dynamic[:, j].reshape(batch, out_channels, -1), cols)
                    g[:, j] = (response * grad_flat).sum(1)
                soft = torch.softmax(guide, dim=1).view_as(g)
                grad_guide = (soft * (g - (soft * g).sum(1, keepdim=True))).view_as(guide)

        return grad_x, grad_weight, grad_bias, grad_dynamic, grad_guide, None, None, None


class _RegionOrder:
    """Pixels of a ``(B, m, Ho, Wo)`` guide sorted by (sample, region).

    Segment ``b * m + j`` holds sample ``b``'s pixels assigned to region ``j``; rows of a
    gathered matrix are contiguous per segment, so each segment is one plain GEMM.
    """

    def __init__(self, guide: Tensor) -> None:
        batch, regions = guide.shape[:2]
        pixels = guide.shape[2] * guide.shape[3]
        region = guide.argmax(1).view(batch, pixels)
        offsets = torch.arange(batch, device=guide.device).unsqueeze(1) * regions
        key = (region + offsets).view(-1)
        order = torch.argsort(key, stable=True)
        self.segments = batch * regions
        self.sample = torch.div(order, pixels, rounding_mode="floor")
        self.pixel = order - self.sample * pixels
        self._counts: list[int] = torch.bincount(key, minlength=self.segments).tolist()

    def parts(self) -> list[tuple[int, slice]]:
        """``(segment, row slice)`` for every non-empty segment."""
        parts = []
        start = 0
        for segment, count in enumerate(self._counts):
            if count:
                parts.append((segment, slice(start, start + count)))
            start += count
        return parts

    def gather(self, flat: Tensor) -> Tensor:
        """``(B, C, L)`` -> ``(B*L, C)`` rows in sorted order."""
        return flat.transpose(1, 2)[self.sample, self.pixel]

    def scatter(self, flat: Tensor, rows: Tensor) -> None:
        """Inverse of :meth:`gather`: write sorted ``(B*L, C)`` rows into ``(B, C, L)``."""
        flat.transpose(1, 2)[self.sample, self.pixel] = rows


def drconv2d(
    x: Tensor,
    weight: Tensor,
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
        weight: shared kernel ``(Cout, Cin, kh, kw)``; bias: ``(Cout,)`` or None.
        dynamic: per-sample region residuals ``(B, m, Cout, Cin, kh, kw)``; region ``j`` of
            sample ``b`` uses ``weight + dynamic[b, j]``.
        guide: guide logits ``(B, m, Ho, Wo)`` on the output grid; pixel ``p`` belongs to
            ``argmax_j guide[b, j, p]``.

    Returns:
        ``(B, Cout, Ho, Wo)``. Differentiable wrt every tensor argument (once). Under
        autocast for ``x``'s device every input is cast to float32 and the result is float32.
    """
    if torch.is_autocast_enabled(x.device.type):
        x, weight, dynamic, guide = (t.float() for t in (x, weight, dynamic, guide))
        bias = None if bias is None else bias.float()
    return _RegionConvFunction.apply(
        x, weight, bias, dynamic, guide, _pair(stride), _pair(padding), _pair(dilation)
    )


class DRConv(nn.Conv2d):
    """Dynamic region-aware conv, a drop-in for a ``groups=1`` ``nn.Conv2d``.

    ``weight`` ``(Cout, Cin, kh, kw)`` and ``bias`` are the shared (static) kernel, under the
    same state-dict keys as the conv it replaces. Region ``j``'s filter for sample ``b`` is
    ``weight + D_j(b)`` with ``D = self.generator(x)`` (:class:`RegionFilterGenerator`);
    the region map is ``argmax`` of the guide conv (``guide_weight`` ``(m, Cin, kh, kw)``,
    ``guide_bias`` ``(m,)``), applied with this conv's stride, padding, dilation and
    padding mode so it lies on the output grid. ``stride``, ``padding`` and ``dilation`` are
    read at forward time, so code that rewrites them on ``nn.Conv2d`` instances keeps working.

    Input ``(B, Cin, H, W)``; output ``(B, Cout, Ho, Wo)`` as for ``nn.Conv2d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t,
        stride: _size_2_t = 1,
        padding: _size_2_t | str = 0,
        dilation: _size_2_t = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        regions: int = 8,
    ) -> None:
        if groups != 1:
            raise ValueError(f"DRConv supports groups=1 only, got groups={groups}")
        if regions < 1:
            raise ValueError(f"DRConv needs regions >= 1, got regions={regions}")
        self.regions = regions
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
        )
        factory = {"device": device, "dtype": dtype}
        self.guide_weight = nn.Parameter(
            torch.empty(regions, in_channels, *self.kernel_size, **factory)
        )
        self.guide_bias = nn.Parameter(torch.empty(regions, **factory))
        _default_conv_init(self.guide_weight, self.guide_bias)
        self.generator = RegionFilterGenerator(
            in_channels, out_channels, self.kernel_size, regions, **factory
        )

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, regions: int = 8) -> DRConv:
        """A DRConv whose outputs equal ``conv``'s until it is trained.

        Copies the kernel, bias and geometry; raises ``ValueError`` if ``conv.groups != 1``.
        """
        if conv.groups != 1:
            raise ValueError(
                f"DRConv.from_conv needs a conv with groups=1, got groups={conv.groups} "
                f"({conv})"
            )
        drconv = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            regions=regions,
        )
        with torch.no_grad():
            drconv.weight.copy_(conv.weight)
            if conv.bias is not None:
                drconv.bias.copy_(conv.bias)
        return drconv

    def reset_parameters(self) -> None:
        super().reset_parameters()
        # nn.Conv2d.__init__ calls this before the region parameters exist.
        if hasattr(self, "generator"):
            _default_conv_init(self.guide_weight, self.guide_bias)
            self.generator.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        stride, dilation = self.stride, self.dilation
        x_in, padding = _pad_input(x, self.padding, self.padding_mode, self.kernel_size, dilation)
        guide = F.conv2d(x_in, self.guide_weight, self.guide_bias, stride, padding, dilation)
        dynamic = self.generator(x)
        return drconv2d(x_in, self.weight, self.bias, dynamic, guide, stride, padding, dilation)

    def to_deploy(self) -> DRConvDeploy:
        """An inference copy (:class:`DRConvDeploy`) with the same eval outputs."""
        return DRConvDeploy(self)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, regions={self.regions}"


class DRConvDeploy(nn.Module):
    """Inference form of :class:`DRConv`: no custom autograd Function, exportable.

    Holds copies of the DRConv's tensors under the same state-dict keys. Forward has no
    data-dependent control flow or shapes (``torch.export`` / ONNX work, batch size may be
    dynamic): it unfolds the input and multiplies it with all ``m`` region filters of each
    sample at once (``bmm``), then picks each pixel's region with ``gather``. That costs
    ``m`` times the FLOPs of the conv and holds the unfolded input ``(B, Cin*kh*kw, Ho*Wo)``
    plus all region outputs ``(B, m, Cout, Ho, Wo)``; use it where exportability matters
    more than speed. Outputs equal DRConv's up to float rounding (same region map).
    """

    def __init__(self, conv: DRConv) -> None:
        super().__init__()
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size: Pair = _pair(conv.kernel_size)
        self.stride: Pair = _pair(conv.stride)
        self.padding: Pair | str = (
            conv.padding if isinstance(conv.padding, str) else _pair(conv.padding)
        )
        self.dilation: Pair = _pair(conv.dilation)
        self.padding_mode = conv.padding_mode
        self.regions = conv.regions
        self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        self.guide_weight = nn.Parameter(conv.guide_weight.detach().clone())
        self.guide_bias = nn.Parameter(conv.guide_bias.detach().clone())
        self.generator = RegionFilterGenerator(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.regions,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        self.generator.load_state_dict(conv.generator.state_dict())

    def forward(self, x: Tensor) -> Tensor:
        stride, dilation = self.stride, self.dilation
        x_in, padding = _pad_input(x, self.padding, self.padding_mode, self.kernel_size, dilation)
        guide = F.conv2d(x_in, self.guide_weight, self.guide_bias, stride, padding, dilation)
        batch, regions, out_h, out_w = guide.shape
        filters = self.weight + self.generator(x)
        cols = F.unfold(x_in, self.kernel_size, dilation, padding, stride)
        responses = torch.bmm(filters.reshape(batch, regions * self.out_channels, -1), cols)
        responses = responses.view(batch, regions, self.out_channels, out_h * out_w)
        region = guide.argmax(1).view(batch, 1, 1, out_h * out_w)
        out = responses.gather(1, region.expand(batch, 1, self.out_channels, out_h * out_w))
        out = out.view(batch, self.out_channels, out_h, out_w)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1)
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"padding_mode={self.padding_mode}, bias={self.bias is not None}, "
            f"regions={self.regions}"
        )


def _pad_input(
    x: Tensor, padding: Pair | str, padding_mode: str, kernel_size: Pair, dilation: Pair
) -> tuple[Tensor, Pair]:
    """Return ``(x, symmetric zero padding)`` for conv/unfold, padding ``x`` itself otherwise.

    Zero padding that is symmetric is left to the conv (so the static part is the same
    ``F.conv2d`` call ``nn.Conv2d`` makes); other modes and the asymmetric ``"same"`` case
    are applied with ``F.pad`` and the conv then pads by 0.
    """
    if padding == "valid":
        return x, (0, 0)
    if padding == "same":
        # nn.Conv2d's split: the extra pixel of an odd total goes to the right/bottom.
        totals = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        pads = [(total // 2, total - total // 2) for total in totals]
    else:
        pads = [(p, p) for p in _pair(padding)]
    (top, bottom), (left, right) = pads
    if padding_mode == "zeros" and top == bottom and left == right:
        return x, (top, left)
    mode = "constant" if padding_mode == "zeros" else padding_mode
    return F.pad(x, (left, right, top, bottom), mode=mode), (0, 0)


def _default_conv_init(weight: Tensor, bias: Tensor) -> None:
    """``nn.Conv2d``'s default initialization for a conv-shaped weight and its bias."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    fan_in = weight[0].numel()
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    nn.init.uniform_(bias, -bound, bound)
