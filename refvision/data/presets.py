"""Transform presets for the three tasks, built from ``torchvision.transforms.v2``.

Every preset takes a decoded ``uint8`` sample and returns what the task consumes, images as
``float32`` RGB in [0, 1] (every model normalises inside, with the mean / std the data module
describes):

- classification: ``Image (3, H, W) uint8`` -> ``float32 (3, S, S)``;
- detection: ``(Image, target)`` -> ``(float32 (3, H', W'), target)``, boxes and all per-box
  fields filtered together; the SSD model resizes too;
- segmentation: ``(Image, Mask int64 (H, W))`` -> ``(float32 (3, H', W'), Mask)``.
"""

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from refvision.data.cityscapes_labels import IGNORE_INDEX
from refvision.data.description import IMAGENET_MEAN

AUTO_AUGMENT = ("ra", "ta_wide", "augmix", "imagenet", "cifar10", "svhn")
"""Accepted ``auto_augment`` names, as in torchvision's classification reference."""

PER_BOX_FIELDS = ("labels", "difficult", "truncated")
"""Target fields holding one entry per box; filtered together with the boxes."""


def classification_train(
    image_size: int,
    interpolation: str = "bilinear",
    auto_augment: str | None = None,
    random_erase: float = 0.0,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    mean: Sequence[float] = IMAGENET_MEAN,
) -> v2.Compose:
    """RandomResizedCrop (area fraction in ``crop_scale``) + flip (+ auto-augment) (+ random erasing).

    Random erasing fills with ``mean`` (the colour the model normalises to 0), as torchvision's
    reference erases normalised images with 0.
    """
    mode = v2.InterpolationMode(interpolation)
    transforms: list[v2.Transform] = [
        v2.RandomResizedCrop(image_size, scale=crop_scale, interpolation=mode, antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if auto_augment is not None:
        transforms.append(_auto_augment(auto_augment, mode))
    transforms.append(v2.ToDtype(torch.float32, scale=True))
    if random_erase > 0:
        transforms.append(v2.RandomErasing(p=random_erase, value=list(mean)))
    return v2.Compose(transforms)


def classification_eval(image_size: int, resize_size: int, interpolation: str = "bilinear") -> v2.Compose:
    """Resize the shorter side to ``resize_size``, center-crop ``image_size``."""
    return v2.Compose(
        [
            v2.Resize(resize_size, interpolation=v2.InterpolationMode(interpolation), antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def _auto_augment(name: str, mode: v2.InterpolationMode) -> v2.Transform:
    if name == "ra":
        return v2.RandAugment(interpolation=mode)
    if name == "ta_wide":
        return v2.TrivialAugmentWide(interpolation=mode)
    if name == "augmix":
        return v2.AugMix(interpolation=mode)
    if name in AUTO_AUGMENT:
        return v2.AutoAugment(v2.AutoAugmentPolicy(name), interpolation=mode)
    raise ValueError(f"auto_augment={name!r} is unknown; expected one of {AUTO_AUGMENT} or None")


def per_box_fields(sample: tuple[Any, dict[str, Any]]) -> tuple[Tensor, ...]:
    """``labels_getter`` for ``SanitizeBoundingBoxes``: every per-box tensor of the target."""
    target = sample[1]
    return tuple(target[key] for key in PER_BOX_FIELDS if key in target)


def detection_train(preset: str = "ssd") -> v2.Compose:
    """SSD augmentation as torchvision's detection reference (``"ssd"`` or ``"ssdlite"``).

    ``"ssd"`` zooms out with the ImageNet mean color, as the SSD paper. RandomIoUCrop can leave
    a sample with no box; torchvision's SSD loss accepts empty targets (background only).
    """
    if preset not in ("ssd", "ssdlite"):
        raise ValueError(f"detection preset {preset!r} is unknown; expected 'ssd' or 'ssdlite'")
    transforms: list[v2.Transform] = []
    if preset == "ssd":
        mean_color = [round(255 * m) for m in IMAGENET_MEAN]
        transforms += [
            v2.RandomPhotometricDistort(),
            v2.RandomZoomOut(fill={tv_tensors.Image: mean_color, "others": 0}),
        ]
    transforms += [
        v2.RandomIoUCrop(),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.SanitizeBoundingBoxes(labels_getter=per_box_fields),
    ]
    return v2.Compose(transforms)


def detection_eval() -> v2.Compose:
    """Convert to ``float32`` in [0, 1]; nothing else (the detector resizes and normalises)."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True)])


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from ``scale_range``, relative to the input size.

    This is MMSegmentation's ``RandomResize(scale=(2048, 1024), ratio_range=...)`` for
    Cityscapes-sized inputs, without tying the base scale to one resolution. Masks are resized
    with nearest neighbour (torchvision does so for ``tv_tensors.Mask``).
    """

    def __init__(self, scale_range: tuple[float, float]) -> None:
        super().__init__()
        low, high = scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.scale_range = (float(low), float(high))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        low, high = self.scale_range
        factor = low + (high - low) * torch.rand(()).item()
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)


def segmentation_train(crop_size: Sequence[int], scale_range: tuple[float, float]) -> v2.Compose:
    """MMSegmentation's Cityscapes pipeline: scale, crop (pad image 0, mask 255), flip, photometric.

    The photometric distortion mirrors MMSeg's ``PhotoMetricDistortion`` (brightness +-32/255
    as a factor, contrast and saturation 0.5..1.5, hue +-18/180, each with probability 0.5).
    MMSeg's ``cat_max_ratio`` crop retry is not reproduced.
    """
    return v2.Compose(
        [
            RandomScale(scale_range),
            v2.RandomCrop(
                list(crop_size), pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
            ),
            v2.RandomHorizontalFlip(),
            v2.RandomPhotometricDistort(
                brightness=(1 - 32 / 255, 1 + 32 / 255), contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=(-0.1, 0.1)
            ),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def segmentation_eval(size: Sequence[int] | None = None) -> v2.Compose:
    """Full resolution, or image (bilinear) and mask (nearest) resized to ``size``."""
    transforms: list[v2.Transform] = [] if size is None else [v2.Resize(list(size), antialias=True)]
    transforms.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(transforms)
