"""refvision: RefConv and DRConv on real vision tasks, with PyTorch Lightning.

The root holds the pure-PyTorch API; the layers below are ``refvision.nn`` (conv methods),
``refvision.surgery``, ``refvision.models`` / ``data`` / ``metrics``, the Lightning rooms
(``refvision.tasks``, ``checkpoints``, ``lifecycle``, ``outputs``, ``export``) and ``refvision.app``
(the command); ``docs/architecture.md`` is the map.
"""

from refvision.nn import ACConv, ConvMethod, DRConv, RefConv, get_method, register_method, registered_methods
from refvision.surgery import (
    ModelProfile,
    conversion_report,
    convert,
    converted_layers,
    format_report,
    profile,
    reparameterize,
)

__all__ = [
    "ACConv",
    "ConvMethod",
    "DRConv",
    "ModelProfile",
    "RefConv",
    "conversion_report",
    "convert",
    "converted_layers",
    "format_report",
    "get_method",
    "profile",
    "register_method",
    "registered_methods",
    "reparameterize",
]
