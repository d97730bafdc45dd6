"""DRConv's inference form: the same region conv without the autograd Function, exportable."""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from refvision.nn.drconv.eager import in_sample_chunks
from refvision.nn.drconv.function import region_conv
from refvision.nn.drconv.generator import RegionFilterGenerator, guide_and_filters
from refvision.nn.drconv.geometry import Pair


class DRConvDeploy(nn.Module):
    """Inference form of :class:`~refvision.nn.drconv.layer.DRConv`: no custom autograd Function, exportable.

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

    def __init__(self, conv: nn.Conv2d) -> None:
        """Copies of the tensors and the geometry of ``conv``, a DRConv."""
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
        return in_sample_chunks(self._forward, x, self.generator.sample_numel)

    def _forward(self, x: Tensor) -> Tensor:
        x_in, padding, guide, filters = guide_and_filters(self, x)
        return region_conv(x_in, filters, self.bias, guide, self.stride, padding, self.dilation)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"padding_mode={self.padding_mode}, bias={self.bias is not None}, "
            f"regions={self.regions}, residual={self.residual}"
        )
