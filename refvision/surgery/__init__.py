"""Model surgery, pure PyTorch: swap convs for a conv method and fold them back, choose what trains, count."""

from refvision.surgery.convert import conversion_report, convert, converted_layers, format_report, reparameterize
from refvision.surgery.profile import ModelProfile, profile
from refvision.surgery.trainable import TRAINABLE_MODES, freeze_norm_statistics, set_trainable

__all__ = [
    "TRAINABLE_MODES",
    "ModelProfile",
    "conversion_report",
    "convert",
    "converted_layers",
    "format_report",
    "freeze_norm_statistics",
    "profile",
    "reparameterize",
    "set_trainable",
]
