"""SSD detectors on torchvision's ``SSD`` class: SSD300-VGG16 and SSDLite320 (MobileNetV3-L / V2)."""

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial
from typing import Literal

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection import ssd300_vgg16, ssdlite320_mobilenet_v3_large
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteHead, _extra_block, _normal_init
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from refvision.models.weights import explain_download_failure

DetectorName = Literal["ssd300_vgg16", "ssdlite320_mobilenet_v3_large", "ssdlite320_mobilenet_v2"]
DETECTORS: tuple[str, ...] = DetectorName.__args__

_BACKBONE_OF = {
    "ssd300_vgg16": "vgg16",
    "ssdlite320_mobilenet_v3_large": "mobilenet_v3_large",
    "ssdlite320_mobilenet_v2": "mobilenet_v2",
}
# SSD paper's VOC evaluation settings: confidence 0.01, NMS 0.45, top 200 per image.
_VOC_POSTPROCESS = {"score_thresh": 0.01, "nms_thresh": 0.45, "detections_per_img": 200}


def build_detector(
    name: str,
    num_classes: int = 21,
    weights_backbone: str | None = None,
    image_size: int | None = None,
) -> SSD:
    """Build an SSD detector for ``num_classes`` labels (background included: 21 for VOC).

    Args:
        name: one of :data:`DETECTORS`.
        weights_backbone: torchvision ImageNet weight name of the backbone (``DEFAULT``,
            ``IMAGENET1K_V1``, ``IMAGENET1K_FEATURES`` for VGG16) or ``None`` (random init).
        image_size: square input side the SSDLite models resize to (default 320). SSD300's anchor
            steps are fixed in pixels, so it only accepts 300.

    The model takes ``list[Tensor (3, H, W)]`` in [0, 1] and normalizes/resizes internally.
    """
    if name not in DETECTORS:
        raise ValueError(f"model.detector={name!r} is not supported; allowed: {', '.join(DETECTORS)}")
    weight = _backbone_weight(_BACKBONE_OF[name], weights_backbone)
    with explain_download_failure(f"{_BACKBONE_OF[name]} weights {weights_backbone}", "model.weights_backbone"):
        if name == "ssd300_vgg16":
            if image_size not in (None, 300):
                raise ValueError(f"model.image_size={image_size}: ssd300_vgg16 works at 300 only")
            model = ssd300_vgg16(weights=None, weights_backbone=weight, num_classes=num_classes, **_VOC_POSTPROCESS)
        elif name == "ssdlite320_mobilenet_v3_large":
            model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=weight, num_classes=num_classes)
        else:
            model = _ssdlite_mobilenet_v2(weight, num_classes)
    if image_size is not None and name != "ssd300_vgg16":
        size = (image_size, image_size)
        t = model.transform
        model.transform = GeneralizedRCNNTransform(
            image_size, image_size, t.image_mean, t.image_std, size_divisible=1, fixed_size=size
        )
        model.size = size
    return model


def _backbone_weight(arch: str, name: str | None) -> torchvision.models.WeightsEnum | None:
    if name is None:
        return None
    enum = torchvision.models.get_model_weights(arch)
    if name == "DEFAULT":
        return enum.DEFAULT
    if name not in enum.__members__:
        raise ValueError(
            f"model.weights_backbone={name!r} is not a weight of {arch}; allowed: "
            f"{', '.join(['DEFAULT', *enum.__members__])}"
        )
    return enum[name]


class MobileNetV2SSDLiteExtractor(nn.Module):
    """SSDLite feature maps from MobileNetV2 (Sandler et al. 2018, section 6.2).

    The first map is the expansion layer of the last stride-16 block's successor (block 14,
    576 channels, stride 16), the second the backbone's last layer (1280 channels, stride 32),
    then four extra depthwise-separable blocks (512, 256, 256, 128 channels).
    """

    def __init__(self, features: nn.Sequential, norm_layer: type[nn.Module]) -> None:
        super().__init__()
        c4 = [i for i, block in enumerate(features) if getattr(block, "_is_cn", False)][-1]
        self.features = nn.Sequential(
            nn.Sequential(*features[:c4], features[c4].conv[0]),
            nn.Sequential(features[c4].conv[1:], *features[c4 + 1 :]),
        )
        self.extra = nn.ModuleList(
            [
                _extra_block(features[-1].out_channels, 512, norm_layer),
                _extra_block(512, 256, norm_layer),
                _extra_block(256, 256, norm_layer),
                _extra_block(256, 128, norm_layer),
            ]
        )
        _normal_init(self.extra)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``x (B, 3, H, W)`` -> six maps ``{"0": (B, 576, H/16, W/16), ..., "5": (B, 128, ...)}``."""
        outputs = []
        for block in (*self.features, *self.extra):
            x = block(x)
            outputs.append(x)
        return OrderedDict((str(i), v) for i, v in enumerate(outputs))


def _ssdlite_mobilenet_v2(weights_backbone: torchvision.models.WeightsEnum | None, num_classes: int) -> SSD:
    norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
    backbone = torchvision.models.mobilenet_v2(weights=weights_backbone, norm_layer=norm_layer)
    if weights_backbone is None:
        _normal_init(backbone)
    extractor = MobileNetV2SSDLiteExtractor(backbone.features, norm_layer)
    size = (320, 320)
    anchors = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    out_channels = det_utils.retrieve_out_channels(extractor, size)
    head = SSDLiteHead(out_channels, anchors.num_anchors_per_location(), num_classes, norm_layer)
    return SSD(
        extractor,
        anchors,
        size,
        num_classes,
        head=head,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        topk_candidates=300,
        **_VOC_POSTPROCESS,
    )


def ssd_raw_outputs(model: nn.Module, images: Sequence[Tensor] | Tensor) -> Tensor:
    """Pre-NMS outputs of a torchvision ``SSD`` on ``images``, as one ``(B, A * (4 + C))`` tensor.

    ``images`` is a list of ``(3, H_i, W_i)`` tensors in [0, 1] or a ``(B, 3, H, W)`` batch. They
    go through ``model.transform`` (resize to the model size, normalize), the backbone and the
    head; the result concatenates the box regression ``(B, A, 4)`` and the class logits
    ``(B, A, C)`` of all ``A`` anchors, each flattened per image. Anchor decoding, score
    thresholding and NMS are left out: they are not parameterized, and they would turn a tiny
    numerical difference into a different set of boxes.
    """
    image_list, _ = model.transform(list(images))
    outputs = model.head(list(model.backbone(image_list.tensors).values()))
    return torch.cat([outputs["bbox_regression"].flatten(1), outputs["cls_logits"].flatten(1)], 1)


class SSDRawOutputs(nn.Module):
    """``forward(images) = ssd_raw_outputs(model, images)``: what profiling and export trace.

    SSD's post-processing (per-class thresholds, NMS, variable-length outputs) cannot be traced,
    so FLOPs and parameters are those of transform + backbone + head.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Sequence[Tensor] | Tensor) -> Tensor:
        return ssd_raw_outputs(self.model, images)
