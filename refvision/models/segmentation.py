"""DeepLabV3+ segmenters from segmentation-models-pytorch."""

import segmentation_models_pytorch as smp
from torch import nn

from refvision.models.weights import HF_CACHE, explain_download_failure


def build_segmenter(
    encoder: str = "mobilenet_v2",
    num_classes: int = 19,
    encoder_weights: str | None = None,
    output_stride: int = 8,
) -> nn.Module:
    """Build ``smp.DeepLabV3Plus`` with ``encoder`` (smp name or ``tu-<timm name>``).

    Args:
        encoder_weights: smp pretrained tag (``imagenet``) or ``None``.
        output_stride: 8 or 16; the encoder's last stages become dilated convs.

    The model maps ``(B, 3, H, W)`` normalized images (H, W divisible by 16) to logits
    ``(B, num_classes, H, W)``.
    """
    if output_stride not in (8, 16):
        raise ValueError(f"model.output_stride={output_stride}; allowed: 8, 16")
    known = smp.encoders.get_encoder_names()
    if not (encoder in known or encoder.startswith("tu-")):
        raise ValueError(
            f"model.encoder={encoder!r} is not an smp encoder nor 'tu-<timm name>'; smp offers: {', '.join(known)}"
        )
    with explain_download_failure(f"{encoder} encoder weights {encoder_weights!r}", "model.encoder_weights", HF_CACHE):
        return smp.DeepLabV3Plus(
            encoder_name=encoder,
            encoder_weights=encoder_weights,
            encoder_output_stride=output_stride,
            classes=num_classes,
        )
