"""ACConv: asymmetric-branch convolution, folded into its k x k kernel for deployment.

After ACNet (Ding et al., "ACNet: Strengthening the Kernel Skeletons for Powerful CNN via
Asymmetric Convolution Blocks", ICCV 2019): a ``k x k`` conv trains beside a ``1 x k`` and a
``k x 1`` branch that share its input, stride and padding. Convolution is linear in the kernel,
so the three branches equal one conv whose kernel adds the asymmetric kernels onto the centre row
and column of the square one. ACConv computes exactly that kernel at every forward, and ``fuse``
writes it into a plain ``nn.Conv2d``. Unlike ACNet's blocks, the branches carry no batch norm of
their own (a BN after the conv stays where the model has it).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from refvision.nn.method import ConvMethod, register_method


@register_method
class ACConv(ConvMethod):
    """A ``kh x kw`` conv (odd sides > 1) with trainable ``1 x kw`` and ``kh x 1`` branch kernels.

    Shapes, ``w = (out_channels, in_channels // groups)``: ``weight`` ``(*w, kh, kw)`` (the replaced
    conv's kernel, trainable), ``hor_weight`` ``(*w, 1, kw)``, ``ver_weight`` ``(*w, kh, 1)``;
    ``bias`` as ``nn.Conv2d``. Forward convolves with :meth:`composed_weight`.

    Args (of :meth:`from_conv`):
        init: ``"zeros"`` (default: the branches start at zero, so the layer starts as the
            replaced conv) or ``"default"`` (PyTorch's conv init).
    """

    kind = "acconv"
    folds_to_conv = True

    @classmethod
    def accepts(cls, conv: nn.Conv2d) -> bool:
        kh, kw = conv.kernel_size
        return kh > 1 and kw > 1 and kh % 2 == 1 and kw % 2 == 1

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, init: Literal["zeros", "default"] = "zeros") -> ACConv:
        if not cls.accepts(conv):
            raise ValueError(f"ACConv needs odd kernel sides > 1, got kernel_size={tuple(conv.kernel_size)}")
        if init not in ("zeros", "default"):
            raise ValueError(f"ACConv init must be 'zeros' or 'default', got {init!r}")
        layer = cls.replacing(conv)
        out_ch, in_ch, kh, kw = conv.weight.shape
        factory = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        layer.hor_weight = nn.Parameter(torch.zeros(out_ch, in_ch, 1, kw, **factory))
        layer.ver_weight = nn.Parameter(torch.zeros(out_ch, in_ch, kh, 1, **factory))
        if init == "default":
            for branch in (layer.hor_weight, layer.ver_weight):
                nn.init.kaiming_uniform_(branch, a=math.sqrt(5))
        return layer

    def composed_weight(self) -> Tensor:
        """``weight`` plus the branch kernels on its centre row and column; shape of ``weight``."""
        kh, kw = self.kernel_size
        hor = F.pad(self.hor_weight, (0, 0, kh // 2, kh // 2))
        ver = F.pad(self.ver_weight, (kw // 2, kw // 2, 0, 0))
        return self.weight + hor + ver

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.composed_weight(), self.bias)

    def fuse(self) -> nn.Conv2d:
        with torch.no_grad():
            return self.plain_conv(self.composed_weight())
