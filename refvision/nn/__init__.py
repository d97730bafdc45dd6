"""Conv methods: pure PyTorch, no Lightning. Importing this package registers the built-in kinds."""

from refvision.nn.acconv import ACConv
from refvision.nn.drconv import DRConv, DRConvDeploy
from refvision.nn.method import ConvMethod, get_method, method_name, register_method, registered_methods
from refvision.nn.refconv import RefConv

__all__ = [
    "ACConv",
    "ConvMethod",
    "DRConv",
    "DRConvDeploy",
    "RefConv",
    "get_method",
    "method_name",
    "register_method",
    "registered_methods",
]
