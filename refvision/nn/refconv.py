"""RefConv: a conv whose kernel is a trainable refocusing of its own frozen kernel.

Cai, Ding et al., "RefConv: Re-parameterized Refocusing Convolution for Powerful
ConvNets", arXiv 2310.10563. The layer computes ``Wt = Wb + T(Wb)`` where ``Wb`` is
the frozen (pretrained) kernel and ``T`` a small grouped conv over ``Wb`` viewed as an
image, then convolves the input with ``Wt``. ``fuse`` stores ``Wt`` in a plain
``nn.Conv2d``: the deployed model is the original architecture.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from refvision.nn.method import ConvMethod, register_method

_INITS = ("default", "zeros")


@register_method
class RefConv(ConvMethod):
    """Drop-in ``nn.Conv2d`` with a frozen basis kernel and a trainable refocusing map.

    Shapes, with ``N = out_channels * in_channels / groups`` and
    ``(kh, kw) = kernel_size``:

    - ``weight``: the basis ``Wb``, ``(out_channels, in_channels // groups, kh, kw)``.
      A persistent *buffer* under the same state-dict key as ``nn.Conv2d.weight``, so a
      baseline checkpoint loads into it; never a parameter, never trained.
    - ``refocus_weight``: ``T``'s kernel, ``(N, N // map_groups, mh, mw)`` with
      ``mh = min(map_k, kh)`` and ``mw = min(map_k, kw)``.
    - ``bias``: unchanged from ``nn.Conv2d``, trainable.

    ``T`` views ``Wb`` as a ``(1, N, kh, kw)`` image and convolves it with
    ``refocus_weight`` (``map_groups`` groups, stride 1, no bias, zero padding chosen
    so the output stays ``kh x kw``; asymmetric, more on the right/bottom, for an even
    map size). ``stride``, ``padding``, ``dilation`` and ``padding_mode`` are read at
    forward time, as in ``nn.Conv2d``.

    Args:
        map_k: requested size of ``T``'s kernel (3 in the paper); clipped per spatial
            dimension to the kernel size, so 1x1 and 1x7 kernels work.
        map_groups: groups ``G`` of ``T``; must divide ``N``. Default
            ``in_channels * out_channels / groups**2`` (each group mixes ``groups`` 2-D
            kernels): a dense transform for a depthwise conv, a per-kernel spatial one
            for a regular conv.
        init: ``"default"`` (PyTorch's conv init on ``refocus_weight``) or ``"zeros"``
            (``Wt == Wb`` at step 0).

    A directly constructed RefConv's basis holds ``nn.Conv2d``'s random init; load the
    baseline's weights, or build it with :meth:`from_conv`.
    """

    kind = "refconv"
    folds_to_conv = True
    needs_trained_weights = True
    weight: Tensor

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        map_k: int = 3,
        map_groups: int | None = None,
        init: str = "default",
    ) -> None:
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
        if map_k < 1:
            raise ValueError(f"RefConv map_k must be >= 1, got {map_k}")
        if init not in _INITS:
            raise ValueError(f"RefConv init must be one of {_INITS}, got {init!r}")
        n = out_channels * in_channels // groups
        default_groups = in_channels * out_channels // groups**2
        if map_groups is None:
            map_groups = default_groups
        if map_groups < 1 or n % map_groups:
            raise ValueError(
                f"RefConv map_groups={map_groups} must be a positive divisor of "
                f"N = out_channels * in_channels / groups = {n} "
                f"(default {default_groups}: each group mixes {groups} kernels)"
            )
        self.map_k = map_k
        self.map_groups = map_groups

        basis = self.weight.detach()
        del self.weight
        self.register_buffer("weight", basis)

        kh, kw = self.kernel_size
        mh, mw = min(map_k, kh), min(map_k, kw)
        self.refocus_weight = nn.Parameter(torch.empty(n, n // map_groups, mh, mw, device=device, dtype=dtype))
        # F.pad order: (left, right, top, bottom); the extra pad of an even map goes last.
        self._map_padding = ((mw - 1) // 2, mw // 2, (mh - 1) // 2, mh // 2)
        if init == "zeros":
            nn.init.zeros_(self.refocus_weight)
        else:
            nn.init.kaiming_uniform_(self.refocus_weight, a=math.sqrt(5))

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        map_k: int = 3,
        map_groups: int | None = None,
        init: Literal["default", "zeros"] = "default",
    ) -> RefConv:
        """A RefConv whose basis is ``conv``'s weight (copied) and bias ``conv``'s bias.

        Same hyperparameters, device and dtype as ``conv``; train/eval mode copied.
        Raises ``ValueError`` for an all-zero kernel: then ``Wt = 0`` and ``T`` gets no
        gradient, so the layer would be dead.
        """
        if isinstance(conv, RefConv) or not isinstance(conv, nn.Conv2d):
            raise TypeError(f"RefConv.from_conv expects an nn.Conv2d, got {type(conv).__name__}")
        if not conv.weight.detach().any():
            raise ValueError(
                "RefConv.from_conv: the conv's weight is all zeros, so the refocused kernel "
                "would be zero and its transform would get no gradient (a dead layer). "
                "Refocusing needs a trained basis: load pretrained or baseline weights "
                "into the model before converting."
            )
        return cls.replacing(conv, map_k=map_k, map_groups=map_groups, init=init)

    def refocused_weight(self) -> Tensor:
        """``Wt = Wb + T(Wb)``, shape and dtype of ``weight``; differentiable in ``refocus_weight``.

        Computed in the weight's dtype even under ``torch.autocast``.
        """
        basis = self.weight
        kh, kw = self.kernel_size
        image = basis.reshape(1, -1, kh, kw)
        with _autocast_disabled(basis.device):
            padded = F.pad(image, self._map_padding)
            mapped = F.conv2d(padded, self.refocus_weight, groups=self.map_groups)
        return basis + mapped.view_as(basis)

    def forward(self, input: Tensor) -> Tensor:
        # Wt is recomputed on every call, in eval mode too: a cached Wt goes stale when weights
        # change through `.data` (EMA / weight averaging), which no version counter records.
        # The deploy form (`fuse`) is the way to run without the transform.
        return self._conv_forward(input, self.refocused_weight(), self.bias)

    def fuse(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` computing the same function: weight ``Wt`` (detached), bias copied.

        Same channels, kernel, stride, padding, dilation, groups, padding mode, device,
        dtype and train/eval mode.
        """
        with torch.no_grad():
            return self.plain_conv(self.refocused_weight())

    def to_conv(self) -> nn.Conv2d:
        """Deprecated name of :meth:`fuse`."""
        warnings.warn("RefConv.to_conv() is deprecated; use fuse()", DeprecationWarning, stacklevel=2)
        return self.fuse()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, map_k={self.map_k}, map_groups={self.map_groups}"


def _autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager:
    # Only when needed: an autocast region shows up in exported graphs even when disabled.
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
