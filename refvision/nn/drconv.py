"""DRConv: dynamic region-aware convolution (Chen et al., CVPR 2021, arXiv 2003.12243).

A learned *guide* conv splits the output plane into ``m`` regions (per-pixel argmax), and
every region gets its own input-dependent filter; each output pixel is computed with the
one filter of its region.

Choices made here (docs/methods.md states what the paper and the official code do, and where
refvision differs):

* **Filter generator: the paper's**, ``AdaptiveAvgPool2d((kh, kw))`` -> 1x1 conv
  ``Cin -> m^2`` -> sigmoid -> grouped 1x1 conv ``m^2 -> m*Cout*Cin`` (``m`` groups) ->
  ``m`` filters ``D_j(b)`` of ``Cout x Cin x kh x kw`` per sample (not the official code's
  CondConv-style mixture of basis kernels).
* **Two forms, one option** (``residual``). ``residual=False`` is the paper's layer: region
  ``j``'s filter is ``D_j(b)``, there is no static kernel (``weight`` is None), the generator
  starts at ``nn.Conv2d``'s default scale, and guide and generator get gradient from step 0;
  use it to train from scratch. ``residual=True`` (default) is the *function-preserving
  residual variant*: the filter is ``weight + D_j(b)`` with ``weight`` the replaced conv's
  kernel and ``D`` zero-initialised, so ``from_conv(conv)`` returns ``conv``'s outputs (up to
  float rounding) until trained; its guide gets zero gradient on the first step (all regions
  share one filter) and learns from the second. Use it to fine-tune a trained conv.
* **Backward through the argmax (paper's rule).** The forward pass uses the hard one-hot
  mask; with ``S = softmax(F)`` over regions and ``g_j = sum_c dL/dY_c * Y^(j)_c``, the guide
  logits get ``dL/dF = S * (g - sum_j S_j g_j)``. Region ``j``'s filter only receives
  gradient from pixels assigned to ``j``.
* **Cost.** The static kernel is folded into every (sample, region) filter and the output
  pixels become GEMM rows grouped by (sample, region), so the region conv has one conv's
  multiply-adds, never ``m`` dense convs. Two layouts of those rows, one result:
  :class:`_GroupedLayout` (eager CPU without autograd recording, which covers the Function's
  forward and backward, eval and the deploy form): pixels sorted by (sample, region), one GEMM
  per non-empty group with its filter read in place, samples in chunks so that neither the patch
  matrix nor (at inference) the generator's output is built for the whole batch; the group sizes
  are read on the host, free on CPU. :class:`_TiledLayout` (CUDA, autograd-recording calls,
  traced and exported graphs): fixed-size tiles, one ``torch.bmm``, at most ``m * T`` padding
  rows per sample (:func:`region_conv_macs`); every shape depends on the input's shape only and
  nothing is read back to the host, so CUDA runs it without syncs and the inference form exports;
  each tile copies its filter (``B * (P / T + m)`` filters). Backward: one GEMM each for the
  input and the filter gradients; the guide gradient needs every region's response at every
  pixel (inherent to the rule): ``m - 1`` region GEMMs / convs on ``filters[j] - filters[0]``,
  one region at a time, so the extra memory is one output-sized buffer. Only ``x``, the
  filters, the guide logits and index vectors are saved. The generator's output holds
  ``B * m * Cout * Cin * kh * kw`` numbers (and its last layer ``m^2 * Cout * Cin`` weights), the
  price of the paper's generator.
* **Mixed precision.** Under ``torch.autocast`` the guide and generator run in reduced
  precision like any conv; the region conv itself casts its inputs to float32 and runs
  with autocast disabled (forward and backward), returning float32.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from itertools import repeat
from typing import Any, NamedTuple

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
        *,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.zero_init = zero_init
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
        nn.init.zeros_(self.expand_bias)
        if self.zero_init:
            nn.init.zeros_(self.expand_weight)
            return
        # Filters of nn.Conv2d's default scale: D = sum of m terms w * sigmoid(.) ~ w * 0.5, so
        # w ~ U(-2a, 2a) / sqrt(m) gives D the variance of U(-a, a), a = 1 / sqrt(Cin*kh*kw).
        kh, kw = self.kernel_size
        bound = 2 / math.sqrt(self.in_channels * kh * kw * self.regions)
        nn.init.uniform_(self.expand_weight, -bound, bound)

    def forward(self, x: Tensor, static: Tensor | None = None) -> Tensor:
        """``(B, Cin, H, W)`` -> ``(B, m, Cout, Cin, kh, kw)``, plus ``static`` ``(Cout, Cin, kh, kw)``
        (added to every filter in the same pass) if given.

        The result is a view of ``(m, B, kh, kw, Cout, Cin)`` memory, the layout the region conv
        multiplies with (no copy for 1x1 kernels).
        """
        batch, regions = x.shape[0], self.regions
        kh, kw = self.kernel_size
        cout, cin = self.out_channels, self.in_channels
        pooled = F.adaptive_avg_pool2d(x, self.kernel_size)
        hidden = torch.sigmoid(F.conv2d(pooled, self.reduce_weight, self.reduce_bias))
        # The grouped 1x1 expand conv as one bmm over the m groups (mkldnn's grouped conv with
        # m*Cout*Cin output channels is slow): (m, B*kh*kw, m) @ (m, m, Cout*Cin).
        hidden = hidden.view(batch, regions, regions, kh * kw).permute(1, 0, 3, 2)
        expand = self.expand_weight.view(regions, cout * cin, regions).transpose(1, 2)
        filters = torch.bmm(hidden.reshape(regions, batch * kh * kw, regions), expand)
        shift = self.expand_bias.view(regions, 1, 1, cout * cin)
        if static is not None:
            shift = shift + static.permute(2, 3, 0, 1).reshape(1, 1, kh * kw, cout * cin)
        filters = filters.view(regions, batch, kh * kw, cout * cin).add_(shift)
        return filters.view(regions, batch, kh, kw, cout, cin).permute(1, 0, 4, 5, 2, 3)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, regions={self.regions}"


class _RegionConvFunction(torch.autograd.Function):
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
            layout = _region_layout(guide)
            out = _region_conv(x, filters, bias, layout, stride, padding, dilation)
        ctx.save_for_backward(x, filters, guide)
        ctx.layout = layout
        ctx.geometry = (stride, padding, dilation)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, filters, guide = ctx.saved_tensors
        layout: _RegionLayout = ctx.layout
        need_x, need_filters, need_bias, need_guide = ctx.needs_input_grad[:4]
        grad_bias = grad_guide = grad_filters = None
        with torch.autocast(x.device.type, enabled=False):
            patches = _SlotPatches(layout, x.shape, filters.shape[-2:], *ctx.geometry)
            grad_rows = grad_out.permute(0, 2, 3, 1).reshape(-1, grad_out.shape[1])
            needs = _Needs(need_x, need_filters, need_guide)
            grad_x, summed, responses = layout.backward(patches, x, _group_filters(filters), grad_rows, needs)
            if need_bias:
                grad_bias = grad_out.sum((0, 2, 3))
            if need_filters:
                grad_filters = _ungroup_filters(summed, filters.shape)
            if need_guide:
                soft = torch.softmax(guide, dim=1)
                grad_guide = soft * (responses - (soft * responses).sum(1, keepdim=True))
        return grad_x, grad_filters, grad_bias, grad_guide, None, None, None


class _Needs(NamedTuple):
    """Which gradients :meth:`_RegionLayout.backward` computes."""

    x: bool
    filters: bool
    guide: bool


_Grads = tuple[Tensor | None, Tensor | None, Tensor | None]


class _RegionLayout:
    """Output pixels as GEMM rows (*slots*) grouped by (sample, region); group of region ``j`` of
    sample ``b`` is multiplied by ``filters[j * B + b]`` of the grouped filters ``(m*B, Cout, K)``
    (:func:`_group_filters`, ``K = kh*kw*Cin``).

    Attributes (``B`` samples, ``P = Ho * Wo`` pixels, ``S`` slots):
        slot_pixel: ``(S,)`` flat pixel ``b * P + p`` held by each slot; ``B * P`` for a padding slot.
        global_slot: ``(B * P,)`` slot of each flat pixel.
    """

    batch: int
    regions: int
    pixels: int
    out_size: Pair
    global_slot: Tensor
    slot_pixel: Tensor

    def rows_to_pixels(self, rows: Tensor) -> Tensor:
        """``(S, C)`` slot rows -> ``(B * P, C)`` pixel rows."""
        return rows.index_select(0, self.global_slot)

    def conv(self, patches: _SlotPatches, x: Tensor, filters: Tensor, bias: Tensor | None) -> Tensor:
        """The region conv: ``(B * P, Cout)`` pixel rows of ``x`` ``(B, Cin, H, W)``."""
        raise NotImplementedError

    def backward(self, patches: _SlotPatches, x: Tensor, filters: Tensor, grad_rows: Tensor, needs: _Needs) -> _Grads:
        """Gradients of :meth:`conv` from its output gradient ``grad_rows`` ``(B * P, Cout)``.

        Returns ``(dL/dx (B, Cin, H, W), dL/dfilters (m*B, Cout, K), g (B, m, Ho, Wo))``, each None
        unless asked for; ``g_j = sum_c dL/dY_c * Y^(j)_c`` (region ``j``'s response at every
        pixel, no bias) up to a per-pixel constant shared by all regions, which cancels in the
        softmax rule. ``g`` is computed from ``filters[j] - filters[0]``, so ``g_0 = 0`` (``m - 1``
        region convs) and regions sharing one filter give exactly zero.
        """
        raise NotImplementedError


class _TiledLayout(_RegionLayout):
    """Fixed-size tiles and one ``torch.bmm`` (ONNX / ExportedProgram / TorchScript friendly).

    Every sample owns ``tiles`` tiles of ``tile`` rows; the pixels of region ``j`` of sample ``b``
    fill ``ceil(count / tile)`` consecutive tiles (the last one padded), the regions following
    each other; ``tiles = ceil(P / tile) + m`` bounds that sum for every region map. Each tile is
    one GEMM with its group's filter, copied per tile. Costs at most ``m * tile`` padding rows
    per sample (see :func:`region_conv_macs`). Every shape depends on ``(B, m, P)`` only and
    nothing is read back to the host, so CUDA runs it without syncs.
    """

    def __init__(self, guide: Tensor) -> None:
        batch, regions, out_h, out_w = guide.shape
        pixels = out_h * out_w
        device = guide.device
        tile = _tile_rows(pixels, regions)
        tiles = -(-pixels // tile) + regions
        self.batch, self.pixels, self.out_size = batch, pixels, (out_h, out_w)
        self.regions, self.tile, self.tiles = regions, tile, tiles

        region = guide.argmax(1).view(batch, pixels)
        one_hot = region.unsqueeze(-1) == torch.arange(regions, device=device)
        running = one_hot.cumsum(1)  # (B, P, m): pixels of each region seen so far
        rank = running.gather(2, region.unsqueeze(-1)).squeeze(-1) - 1
        region_tiles = torch.div(running[:, -1] + tile - 1, tile, rounding_mode="floor")
        tile_end = region_tiles.cumsum(1)  # (B, m)
        first_tile = (tile_end - region_tiles).gather(1, region)
        slot = first_tile * tile + rank

        samples = torch.arange(batch, device=device)
        tile_ids = torch.arange(tiles, device=device)
        tile_region = (tile_end.unsqueeze(1) <= tile_ids.view(1, -1, 1)).sum(-1)
        tile_region = tile_region.clamp(max=regions - 1)  # unused tail tiles: any filter
        self.tile_filter = (tile_region * batch + samples.unsqueeze(1)).view(-1)

        global_slot = slot + samples.unsqueeze(1) * (tiles * tile)
        flat_pixels = torch.arange(batch * pixels, device=device)
        self.global_slot = global_slot.view(-1)
        self.slot_pixel = torch.full((batch * tiles * tile,), batch * pixels, dtype=torch.long, device=device).scatter(
            0, self.global_slot, flat_pixels
        )

    def conv(self, patches: _SlotPatches, x: Tensor, filters: Tensor, bias: Tensor | None) -> Tensor:
        rows = patches.gather(patches.padded_rows(x), 0, patches.slots)
        tiled = rows.view(-1, self.tile, rows.shape[-1])
        out = torch.bmm(tiled, self._tile_filters(filters).transpose(1, 2)).flatten(0, 1)
        out = self.rows_to_pixels(out)
        return out if bias is None else out.add_(bias)

    def backward(self, patches: _SlotPatches, x: Tensor, filters: Tensor, grad_rows: Tensor, needs: _Needs) -> _Grads:
        need_x, need_filters, need_guide = needs
        grad_x = grad_filters = responses = None
        grads = F.pad(grad_rows, (0, 0, 0, 1)).index_select(0, self.slot_pixel)  # 0 in padding
        tiled_grads = grads.view(-1, self.tile, grads.shape[-1])
        if need_filters:
            rows = patches.gather(patches.padded_rows(x), 0, patches.slots)
            per_tile = torch.bmm(tiled_grads.transpose(1, 2), rows.view(-1, self.tile, rows.shape[-1]))
            grad_filters = per_tile.new_zeros(self.batch * self.regions, *per_tile.shape[1:])
            grad_filters.index_add_(0, self.tile_filter, per_tile)
        if need_x:
            rows = torch.bmm(tiled_grads, self._tile_filters(filters)).flatten(0, 1)
            padded = patches.new_padded(rows)
            patches.scatter(padded, rows, 0)
            grad_x = patches.unpad(padded)
        if need_guide:
            responses = _conv_responses(x, filters, grad_rows, self.regions, self.out_size, patches)
        return grad_x, grad_filters, responses

    def _tile_filters(self, filters: Tensor) -> Tensor:
        # Indexing a 2-D view: index_select is much slower for long rows on CPU.
        flat = filters.reshape(filters.shape[0], math.prod(filters.shape[1:]))[self.tile_filter]
        return flat.view(-1, *filters.shape[1:])


class _GroupedLayout(_RegionLayout):
    """Exact groups: the pixels sorted by (sample, region), one GEMM per non-empty group with its
    filter read in place; no padding rows and no filter copies.

    The group sizes are read on the host, which costs nothing for CPU tensors: used in eager mode
    on CPU only (:func:`_region_layout`); CUDA and traced or exported graphs use
    :class:`_TiledLayout`, whose shapes do not depend on the data. Slots are the sorted pixels
    (``S = B * P``; sample ``b`` owns slots ``b * P`` to ``(b + 1) * P``). Samples are processed
    in chunks of about ``_CHUNK_BYTES`` of patches, so the patch matrix is never built whole.
    """

    def __init__(self, guide: Tensor) -> None:
        batch, regions, out_h, out_w = guide.shape
        pixels = out_h * out_w
        device = guide.device
        self.batch, self.regions, self.pixels, self.out_size = batch, regions, pixels, (out_h, out_w)
        samples = torch.arange(batch, device=device)
        # max(1).indices: argmax's first-maximum rule, and several times faster over dim 1 on CPU.
        region = guide.max(1).indices.view(batch, pixels)
        key = (region + samples.unsqueeze(1) * regions).view(-1)
        self.slot_pixel = torch.argsort(key, stable=True)
        flat_pixels = torch.arange(batch * pixels, device=device)
        self.global_slot = torch.empty_like(flat_pixels).index_copy_(0, self.slot_pixel, flat_pixels)
        self.counts: list[int] = torch.bincount(key, minlength=batch * regions).tolist()
        """Pixels of group ``b * m + j`` (region ``j`` of sample ``b``), in slot order."""

    def _chunks(self, patch_numel: int, itemsize: int) -> list[tuple[int, int, list[int], list[tuple[int, int]]]]:
        """Chunks of samples of about ``_CHUNK_BYTES`` of patches: ``(first slot, end slot, group
        sizes, (sample, region) of each group)``, groups in slot order."""
        pixels, regions = self.pixels, self.regions
        per_chunk = max(1, _CHUNK_BYTES // (pixels * patch_numel * itemsize))
        chunks = []
        for first in range(0, self.batch, per_chunk):
            stop = min(first + per_chunk, self.batch)
            groups = [(sample, region) for sample in range(first, stop) for region in range(regions)]
            chunks.append((first * pixels, stop * pixels, self.counts[first * regions : stop * regions], groups))
        return chunks

    def _per_group(self, grouped: Tensor) -> list[tuple[Tensor, ...]]:
        """``(m*B, ...)`` in :func:`_group_filters` order -> views ``[j][b]`` (one op per region, not
        one per group: the group loops are bound by per-op overhead for small layers)."""
        return [region.unbind(0) for region in grouped.unflatten(0, (self.regions, self.batch)).unbind(0)]

    def conv(self, patches: _SlotPatches, x: Tensor, filters: Tensor, bias: Tensor | None) -> Tensor:
        flat_x = patches.padded_rows(x)
        out = x.new_empty(self.batch * self.pixels, filters.shape[1])
        transposed = self._per_group(filters.transpose(1, 2))
        for start, end, counts, groups in self._chunks(filters.shape[2], x.element_size()):
            rows = patches.gather(flat_x, start, end).split(counts)
            for (sample, region), count, group_rows, group_out in zip(
                groups, counts, rows, out[start:end].split(counts)
            ):
                if not count:
                    continue
                if bias is None:
                    torch.mm(group_rows, transposed[region][sample], out=group_out)
                else:
                    torch.addmm(bias, group_rows, transposed[region][sample], out=group_out)
        return self.rows_to_pixels(out)

    def backward(self, patches: _SlotPatches, x: Tensor, filters: Tensor, grad_rows: Tensor, needs: _Needs) -> _Grads:
        need_x, need_filters, need_guide = needs
        batch, pixels, regions = self.batch, self.pixels, self.regions
        patch_numel = filters.shape[2]
        grads = grad_rows.index_select(0, self.slot_pixel)
        g = x.new_zeros(regions, batch * pixels) if need_guide else None
        flat_x = patches.padded_rows(x) if need_filters or need_guide else None
        # Every filter gradient is written whole: by its group's GEMM, or zeroed if the group is empty.
        grad_filters = torch.empty_like(filters) if need_filters else None
        filter_grads = self._per_group(grad_filters) if need_filters else None
        per_group = self._per_group(filters) if need_x else None
        padded = patches.new_padded(x) if need_x else None
        for start, end, counts, groups in self._chunks(patch_numel, x.element_size()):
            chunk_grads = grads[start:end]
            rows = patches.gather(flat_x, start, end) if flat_x is not None else None
            patch_grads = x.new_empty(end - start, patch_numel) if need_x else None
            group_rows = rows.split(counts) if need_filters else repeat(None)
            group_patch_grads = patch_grads.split(counts) if need_x else repeat(None)
            for (sample, region), count, grad, row, patch_grad in zip(
                groups, counts, chunk_grads.split(counts), group_rows, group_patch_grads
            ):
                if need_filters:
                    if count:
                        torch.mm(grad.t(), row, out=filter_grads[region][sample])
                    else:
                        filter_grads[region][sample].zero_()
                if need_x and count:
                    torch.mm(grad, per_group[region][sample], out=patch_grad)
            if need_x:
                patches.scatter(padded, patch_grads, start)
            if need_guide:
                # Region j's response on every pixel of the chunk: one batched GEMM per region.
                first, stop = start // pixels, end // pixels
                sample_rows = rows.view(stop - first, pixels, patch_numel)
                for j in range(1, regions):
                    diff = filters[j * batch + first : j * batch + stop] - filters[first:stop]
                    response = torch.bmm(sample_rows, diff.transpose(1, 2)).view(end - start, -1)
                    g[j, start:end] = (response * chunk_grads).sum(1)
        grad_x = patches.unpad(padded) if need_x else None
        responses = None
        if need_guide:
            out_h, out_w = self.out_size
            responses = g.index_select(1, self.global_slot).view(regions, batch, out_h, out_w).transpose(0, 1)
        return grad_x, grad_filters, responses


def _conv_responses(
    x: Tensor, filters: Tensor, grad_rows: Tensor, regions: int, out_size: Pair, patches: _SlotPatches
) -> Tensor:
    """``g (B, m, Ho, Wo)`` of :meth:`_RegionLayout.backward` by direct convs: one per region
    ``j >= 1`` with ``filters[j] - filters[0]`` and the batch folded into groups (no patch matrix),
    so the extra memory is one output-sized response. ``grad_rows`` ``(B * P, Cout)``."""
    batch, cin, height, width = x.shape
    out_h, out_w = out_size
    kh, kw = patches.kernel_size
    folded = x.reshape(1, batch * cin, height, width)
    grads = grad_rows.view(batch, out_h, out_w, grad_rows.shape[1]).permute(0, 3, 1, 2).contiguous()  # as the responses
    g = x.new_zeros(batch, regions, out_h, out_w)
    for j in range(1, regions if batch else 1):  # (conv2d refuses groups=0)
        diff = filters[j * batch : (j + 1) * batch] - filters[:batch]  # (B, Cout, K)
        kernels = diff.view(-1, kh, kw, cin).permute(0, 3, 1, 2)
        response = F.conv2d(folded, kernels, None, *patches.geometry, groups=batch)
        g[:, j] = (response.view_as(grads) * grads).sum(1)
    return g


_CHUNK_BYTES = 8 << 20
"""Patch bytes gathered at once by :class:`_GroupedLayout`: small enough to stay in cache and to be
reused by the allocator instead of fresh (page-faulting) memory on every call."""


def _eager_cpu(tensor: Tensor) -> bool:
    """True for a plain CPU tensor in eager mode with no autograd recording: values can be read on
    the host for free and the ops need not be differentiable or traceable."""
    traced = (
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.onnx.is_in_onnx_export()
    )
    return not traced and tensor.device.type == "cpu" and type(tensor) is Tensor and not torch.is_grad_enabled()


def _region_layout(guide: Tensor) -> _RegionLayout:
    """:class:`_GroupedLayout` where the group sizes can be read for free (:func:`_eager_cpu`), else
    :class:`_TiledLayout` (CUDA: no host syncs; traced or exported graphs: shapes independent of
    the data; grad mode: its ops are differentiable)."""
    return _GroupedLayout(guide) if _eager_cpu(guide) else _TiledLayout(guide)


def _in_sample_chunks(forward: Callable[[Tensor], Tensor], x: Tensor, generator: RegionFilterGenerator) -> Tensor:
    """``forward(x)``, run on chunks of samples where :func:`_eager_cpu` allows, so that the
    generator's output for a chunk (``m * Cout * Cin * kh * kw`` numbers a sample) stays near
    ``_CHUNK_BYTES`` instead of being built for the whole batch. Every sample is computed on its
    own either way (pooling, guide and filters are per sample), so the result is the same."""
    kh, kw = generator.kernel_size
    per_sample = generator.regions * generator.out_channels * generator.in_channels * kh * kw
    chunk = max(1, _CHUNK_BYTES // (per_sample * x.element_size()))
    if not _eager_cpu(x) or chunk >= x.shape[0]:
        return forward(x)
    return torch.cat([forward(part) for part in x.split(chunk)])


class _SlotPatches:
    """The ``kh x kw x Cin`` input patch (taps-major) of every slot of a :class:`_RegionLayout`.

    Patches are gathered with ``index_select`` straight from the channels-last, zero-padded
    input (:meth:`padded_rows`); padding slots read some pixel's patch (their results are never
    used, and their gradients are zero).
    """

    def __init__(
        self,
        layout: _RegionLayout,
        input_shape: torch.Size,
        kernel_size: torch.Size | Pair,
        stride: Pair,
        padding: Pair,
        dilation: Pair,
    ) -> None:
        self._input_shape = input_shape
        self._padding = padding
        self.kernel_size = kernel_size
        self.geometry = (stride, padding, dilation)
        padded_h = input_shape[2] + 2 * padding[0]
        padded_w = input_shape[3] + 2 * padding[1]
        pixels, out_width = layout.pixels, layout.out_size[1]
        flat = layout.slot_pixel.clamp(max=layout.batch * pixels - 1)
        sample = torch.div(flat, pixels, rounding_mode="floor")
        pixel = flat - sample * pixels
        row = torch.div(pixel, out_width, rounding_mode="floor")
        col = pixel - row * out_width
        corner = (sample * padded_h + row * stride[0]) * padded_w + col * stride[1]
        kh, kw = self.kernel_size
        device = flat.device
        tap_rows = torch.arange(kh, device=device) * (dilation[0] * padded_w)
        tap_cols = torch.arange(kw, device=device) * dilation[1]
        taps = (tap_rows.unsqueeze(1) + tap_cols).view(-1)
        self.slots = flat.shape[0]
        self._taps = kh * kw
        self._index = (corner.unsqueeze(1) + taps).view(-1)
        # Eager CPU, undilated rows: a patch row's kw taps are kw adjacent pixels, one contiguous run
        # of kw * Cin numbers; gathering kh runs instead of kh * kw pixels is several times faster.
        self._run = kw if isinstance(layout, _GroupedLayout) and dilation[1] == 1 and kw > 1 else 1
        self._runs = kh if self._run > 1 else self._taps
        self._run_index = (corner.unsqueeze(1) + tap_rows).view(-1) if self._run > 1 else self._index
        # Every input pixel in exactly one patch (1x1, stride 1, no padding) and no padding slots:
        # the adjoint of the gather is a copy, not a sum.
        self._bijective = (
            isinstance(layout, _GroupedLayout)
            and self._taps == 1
            and tuple(stride) == (1, 1)
            and tuple(padding) == (0, 0)
        )

    def padded_rows(self, x: Tensor) -> Tensor:
        """``(B, Cin, H, W)`` -> ``(B * Hp * Wp, Cin)``: zero-padded, channels-last, one row per pixel."""
        pad_h, pad_w = self._padding
        padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h)) if pad_h or pad_w else x
        return padded.permute(0, 2, 3, 1).reshape(-1, x.shape[1])

    def gather(self, flat_x: Tensor, start: int, end: int) -> Tensor:
        """Patches of slots ``start:end`` from :meth:`padded_rows` -> ``(end - start, kh*kw*Cin)``."""
        index = self._run_index[start * self._runs : end * self._runs]
        channels = flat_x.shape[1]
        if self._run == 1:
            return flat_x.index_select(0, index).view(end - start, self._taps * channels)
        # Rows of kw * Cin starting at every pixel (overlapping, read only). index_select's out=
        # form copies from such a strided source several times faster than the allocating form.
        flat_x = flat_x.contiguous()
        flat_x = flat_x.as_strided((flat_x.shape[0] - self._run + 1, self._run * channels), (channels, 1))
        rows = flat_x.new_empty(index.shape[0], flat_x.shape[1])
        return torch.index_select(flat_x, 0, index, out=rows).view(end - start, self._taps * channels)

    def new_padded(self, like: Tensor) -> Tensor:
        """Zeros shaped like :meth:`padded_rows`' result, to :meth:`scatter` into (uninitialised
        where the scatter writes every row once)."""
        batch, channels, height, width = self._input_shape
        pad_h, pad_w = self._padding
        rows = batch * (height + 2 * pad_h) * (width + 2 * pad_w)
        return like.new_empty(rows, channels) if self._bijective else like.new_zeros(rows, channels)

    def scatter(self, padded: Tensor, rows: Tensor, start: int) -> None:
        """Adjoint of :meth:`gather`: add the patches ``rows`` of slots ``start:`` into ``padded``."""
        index = self._index[start * self._taps : (start + rows.shape[0]) * self._taps]
        if self._bijective:
            padded.index_copy_(0, index, rows)
        else:
            padded.index_add_(0, index, rows.reshape(-1, padded.shape[1]))

    def unpad(self, padded: Tensor) -> Tensor:
        """:meth:`new_padded`'s layout -> ``(B, Cin, H, W)`` (channels-last strides)."""
        batch, channels, height, width = self._input_shape
        pad_h, pad_w = self._padding
        grid = padded.view(batch, height + 2 * pad_h, width + 2 * pad_w, channels)
        return grid[:, pad_h : pad_h + height, pad_w : pad_w + width].permute(0, 3, 1, 2)


def _tile_rows(pixels: int, regions: int) -> int:
    """Rows per tile: padding costs ``m * T`` rows per sample, per-tile filter copies ``~ P / T``."""
    return max(4, round(math.sqrt(_TILE_SCALE * pixels / regions)))


_TILE_SCALE = 32


def region_conv_macs(batch: int, regions: int, out_size: Pair, cout: int, patch: int) -> int:
    """Multiply-adds of the tiled region GEMMs for ``B`` samples: ``B * tiles * T`` rows of
    ``patch x cout``.

    That is one conv's ``B * Ho * Wo * patch * cout`` plus the padding rows (at most ``m * T`` per
    sample): what CUDA and exported graphs compute. Eager CPU computes exactly one conv's
    (no padding rows). The guide conv and the generator are counted apart.
    """
    pixels = out_size[0] * out_size[1]
    tile = _tile_rows(pixels, regions)
    tiles = -(-pixels // tile) + regions
    return batch * tiles * tile * patch * cout


def _region_conv(
    x: Tensor,
    filters: Tensor,
    bias: Tensor | None,
    layout: _RegionLayout,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
) -> Tensor:
    """Forward of the region conv. Shapes as :func:`drconv2d`."""
    batch, _, cout = filters.shape[:3]
    out_h, out_w = layout.out_size
    patches = _SlotPatches(layout, x.shape, filters.shape[-2:], stride, padding, dilation)
    out = layout.conv(patches, x, _group_filters(filters), bias)
    return out.view(batch, out_h, out_w, cout).permute(0, 3, 1, 2)


def _group_filters(filters: Tensor) -> Tensor:
    """``(B, m, Cout, Cin, kh, kw)`` -> ``(m*B, Cout, kh*kw*Cin)``: group ``j*B + b``, patch row order."""
    batch, regions, cout = filters.shape[:3]
    return filters.transpose(0, 1).movedim(3, -1).reshape(regions * batch, cout, math.prod(filters.shape[3:]))


def _ungroup_filters(grouped: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of :func:`_group_filters`, to ``shape`` ``(B, m, Cout, Cin, kh, kw)``."""
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
        ``(B, Cout, Ho, Wo)`` (channels-last strides). Differentiable wrt every tensor argument
        (once). Under autocast for ``x``'s device every input is cast to float32 and the result
        is float32.
    """
    filters = dynamic if weight is None else weight + dynamic
    return _region_conv2d(x, filters, bias, guide, stride, padding, dilation)


def _region_conv2d(
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
    return _RegionConvFunction.apply(x, filters, bias, guide, _pair(stride), _pair(padding), _pair(dilation))


@register_method
class DRConv(ConvMethod):
    """Dynamic region-aware conv, a drop-in for a ``groups=1`` ``nn.Conv2d``.

    Region ``j``'s filter for sample ``b`` is ``D_j(b)`` (``residual=False``, the paper's layer)
    or ``weight + D_j(b)`` (``residual=True``, the function-preserving residual variant), with
    ``D = self.generator(x)`` (:class:`RegionFilterGenerator`); the region map is ``argmax`` of
    the guide conv (``guide_weight`` ``(m, Cin, kh, kw)``, ``guide_bias`` ``(m,)``), applied
    with this conv's stride, padding, dilation and padding mode so it lies on the output grid.
    ``stride``, ``padding`` and ``dilation`` are read at forward time, so code that rewrites
    them on ``nn.Conv2d`` instances keeps working.

    ``weight`` and ``bias`` sit under the state-dict keys of the conv it replaces. In the paper's
    layer there is no static kernel: ``weight`` is ``None`` (like ``bias`` of a bias-free conv),
    so it is neither a parameter, nor counted, nor in the state dict; ``bias`` stays.

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
        residual: bool = True,
    ) -> None:
        if groups != 1:
            raise ValueError(f"DRConv supports groups=1 only, got groups={groups}")
        if regions < 1:
            raise ValueError(f"DRConv needs regions >= 1, got regions={regions}")
        self.regions = regions
        self.residual = residual
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
        if not residual:
            del self.weight
            self.register_parameter("weight", None)
        factory = {"device": device, "dtype": dtype}
        self.guide_weight = nn.Parameter(torch.empty(regions, in_channels, *self.kernel_size, **factory))
        self.guide_bias = nn.Parameter(torch.empty(regions, **factory))
        _default_conv_init(self.guide_weight, self.guide_bias)
        self.generator = RegionFilterGenerator(
            in_channels, out_channels, self.kernel_size, regions, zero_init=residual, **factory
        )

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, regions: int = 8, residual: bool = True) -> DRConv:
        """A DRConv with ``conv``'s geometry, device, dtype, bias and train/eval mode.

        ``residual=True``: also copies the kernel into ``weight``; the outputs equal ``conv``'s
        (up to float rounding) until trained. ``residual=False``: the paper's layer, trained from
        scratch (``conv``'s kernel is not used). Raises ``ValueError`` if ``conv.groups != 1``.
        """
        if conv.groups != 1:
            raise ValueError(f"DRConv.from_conv needs a conv with groups=1, got groups={conv.groups} ({conv})")
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
            residual=residual,
        )
        with torch.no_grad():
            if residual:
                drconv.weight.copy_(conv.weight)
            if conv.bias is not None:
                drconv.bias.copy_(conv.bias)
        return drconv.train(conv.training)

    def reset_parameters(self) -> None:
        # nn.Conv2d.__init__ calls this before the region parameters exist.
        if not hasattr(self, "generator"):
            super().reset_parameters()
            return
        if self.weight is not None:
            super().reset_parameters()
        elif self.bias is not None:
            bound = 1 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
            nn.init.uniform_(self.bias, -bound, bound)
        _default_conv_init(self.guide_weight, self.guide_bias)
        self.generator.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        return _in_sample_chunks(self._forward, x, self.generator)

    def _forward(self, x: Tensor) -> Tensor:
        x_in, padding, guide, filters = _guide_and_filters(self, x)
        return _region_conv2d(x_in, filters, self.bias, guide, self.stride, padding, self.dilation)

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
        return f"{super().extra_repr()}, regions={self.regions}, residual={self.residual}"


class DRConvDeploy(nn.Module):
    """Inference form of :class:`DRConv`: no custom autograd Function, exportable.

    Holds copies of the DRConv's tensors under the same state-dict keys and computes the same
    region conv with the same tensor code (one batched GEMM over (sample, region) tiles, the
    static kernel folded into each region filter): one conv's multiply-adds plus the guide conv
    and the generator, never ``m`` dense convs. Every shape depends on the input's shape only
    (no data-dependent control flow), so ``torch.export``, ONNX (dynamo) and ``torch.jit.trace``
    work, with a dynamic batch for the first two. Outputs equal DRConv's up to float rounding.

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
        self.padding: Pair | str = conv.padding if isinstance(conv.padding, str) else _pair(conv.padding)
        self.dilation: Pair = _pair(conv.dilation)
        self.padding_mode = conv.padding_mode
        self.regions = conv.regions
        self.residual = conv.residual
        self.weight = None if conv.weight is None else nn.Parameter(conv.weight.detach().clone())
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())
        self.guide_weight = nn.Parameter(conv.guide_weight.detach().clone())
        self.guide_bias = nn.Parameter(conv.guide_bias.detach().clone())
        self.generator = RegionFilterGenerator(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.regions,
            device=conv.guide_weight.device,
            dtype=conv.guide_weight.dtype,
        )
        self.generator.load_state_dict(conv.generator.state_dict())

    def forward(self, x: Tensor) -> Tensor:
        return _in_sample_chunks(self._forward, x, self.generator)

    def _forward(self, x: Tensor) -> Tensor:
        x_in, padding, guide, filters = _guide_and_filters(self, x)
        return _region_conv(x_in, filters, self.bias, _region_layout(guide), self.stride, padding, self.dilation)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"padding_mode={self.padding_mode}, bias={self.bias is not None}, "
            f"regions={self.regions}, residual={self.residual}"
        )


def _guide_and_filters(layer: DRConv | DRConvDeploy, x: Tensor) -> tuple[Tensor, Pair, Tensor, Tensor]:
    """What both forms compute before the region conv: ``x`` padded for it and its remaining
    (symmetric zero) ``padding`` (:func:`_pad_input`), the guide logits ``(B, m, Ho, Wo)`` and the
    filters ``(B, m, Cout, Cin, kh, kw)`` with the static kernel folded in."""
    x_in, padding = _pad_input(x, layer.padding, layer.padding_mode, layer.kernel_size, layer.dilation)
    guide = F.conv2d(x_in, layer.guide_weight, layer.guide_bias, layer.stride, padding, layer.dilation)
    return x_in, padding, guide, layer.generator(x, layer.weight)


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
