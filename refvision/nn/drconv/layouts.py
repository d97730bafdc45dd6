"""Layouts of the region conv's GEMM rows: the tiled one (CUDA, autograd, exported graphs) and the
grouped one (eager CPU), with their forward and backward GEMMs and the tiled MAC count."""

from __future__ import annotations

import math
from itertools import repeat
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from refvision.nn.drconv import eager
from refvision.nn.drconv.geometry import Pair
from refvision.nn.drconv.patches import SlotPatches


class Needs(NamedTuple):
    """Which gradients :meth:`RegionLayout.backward` computes."""

    x: bool
    filters: bool
    guide: bool


Grads = tuple[Tensor | None, Tensor | None, Tensor | None]


class RegionLayout:
    """Output pixels as GEMM rows (*slots*) grouped by (sample, region); group of region ``j`` of
    sample ``b`` is multiplied by ``filters[j * B + b]`` of the grouped filters ``(m*B, Cout, K)``
    (:func:`~refvision.nn.drconv.function.group_filters`, ``K = kh*kw*Cin``).

    Attributes (``B`` samples, ``P = Ho * Wo`` pixels, ``S`` slots):
        slot_pixel: ``(S,)`` flat pixel ``b * P + p`` held by each slot; ``B * P`` for a padding slot.
        global_slot: ``(B * P,)`` slot of each flat pixel.
    """

    exact: bool = False
    """The slots are exactly the pixels (no padding slots), in eager CPU code (:class:`SlotPatches`)."""
    batch: int
    regions: int
    pixels: int
    out_size: Pair
    global_slot: Tensor
    slot_pixel: Tensor

    def patches(
        self, input_shape: torch.Size, kernel_size: torch.Size | Pair, stride: Pair, padding: Pair, dilation: Pair
    ) -> SlotPatches:
        """The input patches of this layout's slots for an input of ``input_shape`` ``(B, Cin, H, W)``."""
        return SlotPatches(
            self.slot_pixel,
            self.batch,
            self.pixels,
            self.out_size[1],
            self.exact,
            input_shape,
            kernel_size,
            stride,
            padding,
            dilation,
        )

    def rows_to_output(self, rows: Tensor) -> Tensor:
        """``(S, C)`` slot rows -> the output ``(B, C, Ho, Wo)``, channels-last.

        Without autograd recording (the autograd Function's forward, inference) the rows are
        gathered straight into a tensor of its own: a view made inside an autograd Function may not
        be modified in place (``nn.ReLU(inplace=True)`` after the conv), and a copy would cost a
        pass over the output. Recorded (the deploy form's ops in a training or traced graph), it is
        a view of the gathered rows, which autograd follows through in-place ops."""
        channels = rows.shape[1]
        if rows.requires_grad:
            pixels = rows.index_select(0, self.global_slot)
            return pixels.view(self.batch, *self.out_size, channels).permute(0, 3, 1, 2)
        out = torch.empty(
            (self.batch, channels, *self.out_size),
            dtype=rows.dtype,
            device=rows.device,
            memory_format=torch.channels_last,
        )
        torch.index_select(rows, 0, self.global_slot, out=out.permute(0, 2, 3, 1).view(-1, channels))
        return out

    def conv(self, patches: SlotPatches, x: Tensor, filters: Tensor, bias: Tensor | None) -> Tensor:
        """The region conv of ``x`` ``(B, Cin, H, W)``: :meth:`rows_to_output`'s ``(B, Cout, Ho, Wo)``."""
        raise NotImplementedError

    def backward(self, patches: SlotPatches, x: Tensor, filters: Tensor, grad_rows: Tensor, needs: Needs) -> Grads:
        """Gradients of :meth:`conv` from its output gradient ``grad_rows`` ``(B * P, Cout)``.

        Returns ``(dL/dx (B, Cin, H, W), dL/dfilters (m*B, Cout, K), g (B, m, Ho, Wo))``, each None
        unless asked for; ``g_j = sum_c dL/dY_c * Y^(j)_c`` (region ``j``'s response at every
        pixel, no bias) up to a per-pixel constant shared by all regions, which cancels in the
        softmax rule. ``g`` is computed from ``filters[j] - filters[0]``, so ``g_0 = 0`` (``m - 1``
        region convs) and regions sharing one filter give exactly zero.
        """
        raise NotImplementedError


class TiledLayout(RegionLayout):
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
        tile = tile_rows(pixels, regions)
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

    def conv(self, patches: SlotPatches, x: Tensor, filters: Tensor, bias: Tensor | None) -> Tensor:
        rows = patches.gather(patches.padded_rows(x), 0, patches.slots)
        tiled = rows.view(-1, self.tile, rows.shape[-1])
        out = torch.bmm(tiled, self._tile_filters(filters).transpose(1, 2)).flatten(0, 1)
        out = self.rows_to_output(out)
        return out if bias is None else out.add_(bias.view(-1, 1, 1))

    def backward(self, patches: SlotPatches, x: Tensor, filters: Tensor, grad_rows: Tensor, needs: Needs) -> Grads:
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


class GroupedLayout(RegionLayout):
    """Exact groups: the pixels sorted by (sample, region), one GEMM per non-empty group with its
    filter read in place; no padding rows and no filter copies.

    The group sizes are read on the host, which costs nothing for CPU tensors: used in eager mode
    on CPU only (:func:`region_layout`); CUDA and traced or exported graphs use
    :class:`TiledLayout`, whose shapes do not depend on the data. Slots are the sorted pixels
    (``S = B * P``; sample ``b`` owns slots ``b * P`` to ``(b + 1) * P``). Samples are processed
    in chunks of about :data:`~refvision.nn.drconv.eager.CHUNK_BYTES` of patches, so the patch matrix
    is never built whole.
    """

    exact = True

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
        """Chunks of samples of about ``CHUNK_BYTES`` of patches: ``(first slot, end slot, group
        sizes, (sample, region) of each group)``, groups in slot order."""
        pixels, regions = self.pixels, self.regions
        per_chunk = eager.samples_per_chunk(pixels * patch_numel * itemsize)
        chunks = []
        for first in range(0, self.batch, per_chunk):
            stop = min(first + per_chunk, self.batch)
            groups = [(sample, region) for sample in range(first, stop) for region in range(regions)]
            chunks.append((first * pixels, stop * pixels, self.counts[first * regions : stop * regions], groups))
        return chunks

    def _per_group(self, grouped: Tensor) -> list[tuple[Tensor, ...]]:
        """``(m*B, ...)`` in :func:`group_filters` order -> views ``[j][b]`` (one op per region, not
        one per group: the group loops are bound by per-op overhead for small layers)."""
        return [region.unbind(0) for region in grouped.unflatten(0, (self.regions, self.batch)).unbind(0)]

    def conv(self, patches: SlotPatches, x: Tensor, filters: Tensor, bias: Tensor | None) -> Tensor:
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
        return self.rows_to_output(out)

    def backward(self, patches: SlotPatches, x: Tensor, filters: Tensor, grad_rows: Tensor, needs: Needs) -> Grads:
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
    x: Tensor, filters: Tensor, grad_rows: Tensor, regions: int, out_size: Pair, patches: SlotPatches
) -> Tensor:
    """``g (B, m, Ho, Wo)`` of :meth:`RegionLayout.backward` by direct convs: one per region
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


def region_layout(guide: Tensor) -> RegionLayout:
    """:class:`GroupedLayout` where the group sizes can be read for free (:func:`eager_cpu`), else
    :class:`TiledLayout` (CUDA: no host syncs; traced or exported graphs: shapes independent of
    the data; grad mode: its ops are differentiable)."""
    return GroupedLayout(guide) if eager.eager_cpu(guide) else TiledLayout(guide)


def tile_rows(pixels: int, regions: int) -> int:
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
    tile = tile_rows(pixels, regions)
    tiles = -(-pixels // tile) + regions
    return batch * tiles * tile * patch * cout
