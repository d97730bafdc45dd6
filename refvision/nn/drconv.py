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
* **Cost.** Forward: the shared kernel as one ordinary ``F.conv2d``, plus the residuals
  applied per (sample, region): pixels are sorted by (sample, region), each output pixel's
  input patch is gathered with ``index_select`` from the channels-last input (no im2col
  buffer), and each group of patches is multiplied by its own region's residual only: one
  conv's worth of GEMMs, not ``m``. Backward: one conv's worth of GEMMs each for the input
  gradient (summed back with ``index_add_``) and for the filter gradients; the guide
  gradient needs every region's response at every pixel (inherent to the rule), i.e. ``m``
  convs, computed one region at a time (batch folded into groups) so the extra memory
  stays ``O(B * Cout * Ho * Wo)``. Only the inputs are saved for backward. Training, eval
  and no-grad calls share this one code path. The generator's output holds
  ``B * m * Cout * Cin * kh * kw`` numbers (and its last layer ``m^2 * Cout * Cin``
  weights), the price of the paper's generator.
* **Mixed precision.** Under ``torch.autocast`` the guide and generator run in reduced
  precision like any conv; the region conv itself casts its inputs to float32 and runs
  with autocast disabled (forward and backward), returning float32.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable
from torch.nn.common_types import _size_2_t
from torch.nn.modules.utils import _pair

from refvision.nn.method import ConvMethod, register_method

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
    Saves only its inputs; the input patches are gathered again in backward, so memory is
    that of a plain conv plus the dynamic filters.
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
            patches = _RegionPatches(guide, x.shape, weight.shape[-2:], stride, padding, dilation)
            rows = patches.gather(x)
            residuals = _taps_last(dynamic.flatten(0, 1))
            residual_rows = rows.new_empty(rows.shape[0], out.shape[1])
            for segment, part in patches.parts():
                torch.mm(rows[part], residuals[segment].t(), out=residual_rows[part])
            out = out + patches.unsort(residual_rows)
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
            patches = _RegionPatches(guide, x.shape, weight.shape[-2:], stride, padding, dilation)
            grads = patches.sort(grad_out)
            residuals = _taps_last(dynamic.flatten(0, 1))

            if need_bias:
                grad_bias = grad_out.sum((0, 2, 3))

            if need_weight or need_dynamic:
                rows = patches.gather(x)
                grad_filters = rows.new_zeros(residuals.shape)
                for segment, part in patches.parts():
                    torch.mm(grads[part].t(), rows[part], out=grad_filters[segment])
                del rows
                grad_filters = _taps_first(grad_filters, weight.shape)
                if need_weight:
                    grad_weight = grad_filters.sum(0)
                if need_dynamic:
                    grad_dynamic = grad_filters.view_as(dynamic)

            if need_guide:
                geometry = (stride, padding, dilation)
                grad_guide = _softmax_rule_grad(x, dynamic, guide, grad_out, *geometry)

            if need_x:
                filters = _taps_last(weight).unsqueeze(0) + residuals
                grad_rows = grads.new_empty(grads.shape[0], filters.shape[2])
                for segment, part in patches.parts():
                    torch.mm(grads[part], filters[segment], out=grad_rows[part])
                grad_x = patches.scatter(grad_rows)

        return grad_x, grad_weight, grad_bias, grad_dynamic, grad_guide, None, None, None


class _RegionPatches:
    """Input patches of every output pixel, as rows sorted by (sample, region).

    Row ``n`` of :meth:`gather` is the ``kh x kw x Cin`` patch (taps-major) that output pixel
    ``order[n]`` sees; the pixels of sample ``b`` assigned to region ``j`` are one contiguous
    range of rows (segment ``b * m + j``), so each segment is one plain GEMM. Patches are
    gathered straight from the channels-last input with ``index_select`` (no im2col buffer).
    """

    def __init__(
        self,
        guide: Tensor,
        input_shape: torch.Size,
        kernel_size: torch.Size,
        stride: Pair,
        padding: Pair,
        dilation: Pair,
    ) -> None:
        batch, regions, out_h, out_w = guide.shape
        pixels = out_h * out_w
        self._input_shape = input_shape
        self._padding = padding
        padded_h = input_shape[2] + 2 * padding[0]
        padded_w = input_shape[3] + 2 * padding[1]
        device = guide.device

        region = guide.argmax(1).view(batch, pixels)
        key = (region + torch.arange(batch, device=device).unsqueeze(1) * regions).view(-1)
        self._order = torch.argsort(key, stable=True)
        self._inverse = torch.argsort(self._order)
        self._counts: list[int] = torch.bincount(key, minlength=batch * regions).tolist()

        sample = torch.div(self._order, pixels, rounding_mode="floor")
        pixel = self._order - sample * pixels
        row = torch.div(pixel, out_w, rounding_mode="floor")
        col = pixel - row * out_w
        corner = (sample * padded_h + row * stride[0]) * padded_w + col * stride[1]
        kh, kw = kernel_size
        tap_rows = torch.arange(kh, device=device) * dilation[0] * padded_w
        tap_cols = torch.arange(kw, device=device) * dilation[1]
        taps = (tap_rows.unsqueeze(1) + tap_cols).view(-1)
        self._taps = (corner.unsqueeze(1) + taps).view(-1)
        self._out_shape = (batch, out_h, out_w)

    def parts(self) -> list[tuple[int, slice]]:
        """``(segment, row slice)`` for every non-empty segment."""
        parts = []
        start = 0
        for segment, count in enumerate(self._counts):
            if count:
                parts.append((segment, slice(start, start + count)))
            start += count
        return parts

    def gather(self, x: Tensor) -> Tensor:
        """``(B, Cin, H, W)`` -> patches ``(B*Ho*Wo, kh*kw*Cin)`` in sorted order."""
        pad_h, pad_w = self._padding
        padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h)) if pad_h or pad_w else x
        channels = x.shape[1]
        flat = padded.permute(0, 2, 3, 1).reshape(-1, channels)
        return flat.index_select(0, self._taps).view(self._order.shape[0], -1)

    def scatter(self, rows: Tensor) -> Tensor:
        """Adjoint of :meth:`gather`: sum patch rows back into a ``(B, Cin, H, W)`` input."""
        batch, channels, height, width = self._input_shape
        pad_h, pad_w = self._padding
        padded = rows.new_zeros(batch, height + 2 * pad_h, width + 2 * pad_w, channels)
        padded.view(-1, channels).index_add_(0, self._taps, rows.view(-1, channels))
        return padded[:, pad_h : pad_h + height, pad_w : pad_w + width].permute(0, 3, 1, 2)

    def sort(self, t: Tensor) -> Tensor:
        """``(B, C, Ho, Wo)`` -> rows ``(B*Ho*Wo, C)`` in sorted order."""
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).index_select(0, self._order)

    def unsort(self, rows: Tensor) -> Tensor:
        """Inverse of :meth:`sort`: rows ``(B*Ho*Wo, C)`` -> ``(B, C, Ho, Wo)`` (a strided view)."""
        return rows.index_select(0, self._inverse).view(*self._out_shape, -1).permute(0, 3, 1, 2)


def _softmax_rule_grad(
    x: Tensor,
    dynamic: Tensor,
    guide: Tensor,
    grad_out: Tensor,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
) -> Tensor:
    """``dL/dF = S * (g - sum_j S_j g_j)`` for guide logits ``F`` ``(B, m, Ho, Wo)``.

    ``g_j = sum_c dL/dY_c * Y^(j)_c`` needs region ``j``'s response at every pixel; it is
    computed one region at a time (one conv per region, batch folded into groups), so the
    extra memory is one ``(B, Cout, Ho, Wo)`` response. The shared kernel and bias add the
    same amount to every ``g_j``, which cancels in ``g - sum_j S_j g_j``, so only the
    residuals enter ``g``.
    """
    batch, regions = guide.shape[:2]
    cin, height, width = x.shape[1:]
    folded = x.reshape(1, batch * cin, height, width)
    g = torch.empty_like(guide)
    for j in range(regions):
        filters = dynamic[:, j].reshape(-1, *dynamic.shape[-3:])
        response = F.conv2d(folded, filters, None, stride, padding, dilation, batch)
        g[:, j] = (response.view_as(grad_out) * grad_out).sum(1)
    soft = torch.softmax(guide, dim=1)
    return soft * (g - (soft * g).sum(1, keepdim=True))


def _taps_last(filters: Tensor) -> Tensor:
    """``(..., Cout, Cin, kh, kw)`` -> ``(..., Cout, kh*kw*Cin)``, the patch row order."""
    return filters.movedim(-3, -1).flatten(-3)


def _taps_first(filters: Tensor, weight_shape: torch.Size) -> Tensor:
    """Inverse of :func:`_taps_last` for ``(S, Cout, kh*kw*Cin)``: ``(S, Cout, Cin, kh, kw)``."""
    cout, cin, kh, kw = weight_shape
    return filters.view(-1, cout, kh, kw, cin).movedim(-1, 2)


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


@register_method
class DRConv(ConvMethod):
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

    kind = "drconv"

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

    @classmethod
    def accepts(cls, conv: nn.Conv2d) -> bool:
        return conv.groups == 1

    def fuse(self) -> DRConvDeploy:
        """An inference copy (:class:`DRConvDeploy`) with the same eval outputs."""
        return DRConvDeploy(self).train(self.training)

    def to_deploy(self) -> DRConvDeploy:
        """Deprecated name of :meth:`fuse`."""
        warnings.warn("DRConv.to_deploy() is deprecated; use fuse()", DeprecationWarning, stacklevel=2)
        return self.fuse()

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

    ONNX: use the dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``). The
    TorchScript-based one handles 1x1 kernels but rejects the generator's
    ``adaptive_avg_pool2d`` when the input size is not a multiple of ``kh x kw``.
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
    if not any((top, bottom, left, right)):
        return x, (0, 0)
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
