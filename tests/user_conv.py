"""A conv method written outside refvision, as a user would: RepVGG-style k x k + 1 x 1 branch.

Used by the protocol tests through its class path (``conv.kind: user_conv.RepBranchConv``): it
is not registered and refvision knows nothing of it beyond the ConvMethod protocol.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from refvision.nn import ConvMethod


class RepBranchConv(ConvMethod):
    """``weight`` (k x k, odd, square) plus a trainable 1 x 1 ``point_weight`` folded into its centre tap."""

    kind = "repbranch"
    folds_to_conv = True

    @classmethod
    def accepts(cls, conv: nn.Conv2d) -> bool:
        kh, kw = conv.kernel_size
        return kh == kw and kh % 2 == 1 and kh > 1

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, scale: float = 0.0) -> RepBranchConv:
        layer = cls.replacing(conv)
        point_shape = (conv.out_channels, conv.in_channels // conv.groups, 1, 1)
        layer.point_weight = nn.Parameter(
            torch.full(point_shape, scale, device=conv.weight.device, dtype=conv.weight.dtype)
        )
        return layer

    def kernel(self) -> Tensor:
        k = self.kernel_size[0] // 2
        return self.weight + F.pad(self.point_weight, (k, k, k, k))

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.kernel(), self.bias)

    def fuse(self) -> nn.Conv2d:
        with torch.no_grad():
            return self.plain_conv(self.kernel())
