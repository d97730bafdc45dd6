"""refvision: RefConv and DRConv on real vision tasks, with PyTorch Lightning."""

from refvision.convert import convert, reparameterize
from refvision.nn.drconv import DRConv
from refvision.nn.refconv import RefConv
from refvision.profile import profile

__all__ = ["DRConv", "RefConv", "convert", "profile", "reparameterize"]
