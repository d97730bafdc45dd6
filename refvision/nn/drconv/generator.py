"""The guide and the filter generator: what both DRConv forms compute before the region conv."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.common_types import _size_2_t
from torch.nn.modules.utils import _pair

from refvision.nn.drconv.geometry import Pair, pad_input


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
        default_conv_init(self.reduce_weight, self.reduce_bias)
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

    @property
    def sample_numel(self) -> int:
        """Numbers of one sample's filters: ``m * Cout * Cin * kh * kw``."""
        kh, kw = self.kernel_size
        return self.regions * self.out_channels * self.in_channels * kh * kw

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, regions={self.regions}"


def guide_and_filters(layer: nn.Module, x: Tensor) -> tuple[Tensor, Pair, Tensor, Tensor]:
    """What both forms (``layer``: a DRConv or a DRConvDeploy) compute before the region conv: ``x``
    padded for it and its remaining
    (symmetric zero) ``padding`` (:func:`pad_input`), the guide logits ``(B, m, Ho, Wo)`` and the
    filters ``(B, m, Cout, Cin, kh, kw)`` with the static kernel folded in."""
    x_in, padding = pad_input(x, layer.padding, layer.padding_mode, layer.kernel_size, layer.dilation)
    guide = F.conv2d(x_in, layer.guide_weight, layer.guide_bias, layer.stride, padding, layer.dilation)
    return x_in, padding, guide, layer.generator(x, layer.weight)


def default_conv_init(weight: Tensor, bias: Tensor) -> None:
    """``nn.Conv2d``'s default initialization for a conv-shaped weight and its bias."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    fan_in = weight[0].numel()
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    nn.init.uniform_(bias, -bound, bound)
