"""Patch gathering: the ``kh x kw x Cin`` input patch of every GEMM row of a region layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from refvision.nn.drconv.geometry import Pair


class SlotPatches:
    """The ``kh x kw x Cin`` input patch (taps-major) of every slot of a region layout
    (:class:`~refvision.nn.drconv.layouts.RegionLayout`, which builds it: :meth:`RegionLayout.patches`).

    Patches are gathered with ``index_select`` straight from the channels-last, zero-padded
    input (:meth:`padded_rows`); padding slots read some pixel's patch (their results are never
    used, and their gradients are zero).

    Args:
        slot_pixel: ``(S,)`` flat output pixel ``b * P + p`` of each slot, ``B * P`` for a padding slot.
        batch, pixels, out_width: ``B``, ``P = Ho * Wo`` and ``Wo``.
        exact: the slots are exactly the pixels (no padding slots) and run in eager CPU code, where
            the contiguous-run gather (not differentiable) and the copy adjoint apply.
        input_shape: ``(B, Cin, H, W)`` of the input; the rest is the conv's geometry.
    """

    def __init__(
        self,
        slot_pixel: Tensor,
        batch: int,
        pixels: int,
        out_width: int,
        exact: bool,
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
        flat = slot_pixel.clamp(max=batch * pixels - 1)
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
        self._run = kw if exact and dilation[1] == 1 and kw > 1 else 1
        self._runs = kh if self._run > 1 else self._taps
        self._run_index = (corner.unsqueeze(1) + tap_rows).view(-1) if self._run > 1 else self._index
        # Every input pixel in exactly one patch (1x1, stride 1, no padding) and no padding slots:
        # the adjoint of the gather is a copy, not a sum.
        self._bijective = exact and self._taps == 1 and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)

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
