"""The input normalisation every refvision model applies to its [0, 1] RGB input."""

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel on ``(B, 3, H, W)`` (or ``(3, H, W)``) RGB in [0, 1].

    ``mean`` and ``std`` are non-persistent buffers: they follow the module's device and dtype
    and are part of traced / exported graphs, but not of state dicts, so a network wrapped with
    this module keeps its checkpoint keys.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean={list(mean)}, std={list(std)}: expected 3 values each (R, G, B)")
        if min(std) <= 0:
            raise ValueError(f"std={list(std)}: every value must be positive")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return (images - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
