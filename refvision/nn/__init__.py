"""Convolution modules: pure PyTorch, no Lightning."""

from refvision.nn.drconv import DRConv
from refvision.nn.refconv import RefConv

__all__ = ["DRConv", "RefConv"]
