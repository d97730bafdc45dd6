"""DRConv, the layer: a conv method whose filter depends on the sample and on the region of the pixel."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn
from torch.nn.common_types import _size_2_t

from refvision.nn.drconv.deploy import DRConvDeploy
from refvision.nn.drconv.eager import in_sample_chunks
from refvision.nn.drconv.function import REGION_CONV_OP, region_conv2d, region_conv_flops
from refvision.nn.drconv.generator import RegionFilterGenerator, default_conv_init, guide_and_filters
from refvision.nn.method import ConvMethod, register_method


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
    flop_handles = {REGION_CONV_OP: region_conv_flops}

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
        default_conv_init(self.guide_weight, self.guide_bias)
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
        return cls.replacing(conv, regions=regions, residual=residual)

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
        default_conv_init(self.guide_weight, self.guide_bias)
        self.generator.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        return in_sample_chunks(self._forward, x, self.generator.sample_numel)

    def _forward(self, x: Tensor) -> Tensor:
        x_in, padding, guide, filters = guide_and_filters(self, x)
        return region_conv2d(x_in, filters, self.bias, guide, self.stride, padding, self.dilation)

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
