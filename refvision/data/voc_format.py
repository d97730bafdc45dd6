"""Pascal VOC facts decided once: the class list, the detection labels and the box convention.

VOC annotations store boxes as 1-based, inclusive pixel indices ``(xmin, ymin, xmax, ymax)``:
a box covering exactly the first pixel is ``(1, 1, 1, 1)``. refvision models (torchvision's
``SSD``) use 0-based continuous corner coordinates, where that pixel spans ``[0, 1] x [0, 1]``.
The two conversions below are the only place this is decided. Under this mapping the VOC
devkit's "+1" width/area rule on inclusive boxes equals plain continuous IoU on converted boxes.
"""

import torch
from torch import Tensor

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
"""The 20 VOC classes; detection label ``i + 1`` is ``VOC_CLASSES[i]`` (0 is background)."""

VOC_LABELS: tuple[str, ...] = ("__background__", *VOC_CLASSES)
"""The names of the 21 detection labels, background first: label ``i`` is ``VOC_LABELS[i]``."""


def voc_to_xyxy(boxes: Tensor) -> Tensor:
    """Map VOC inclusive 1-based boxes ``(N, 4)`` to 0-based continuous ``xyxy`` ``(N, 4)``."""
    boxes = boxes.to(torch.float32)
    return torch.stack((boxes[:, 0] - 1, boxes[:, 1] - 1, boxes[:, 2], boxes[:, 3]), dim=1)


def xyxy_to_voc(boxes: Tensor) -> Tensor:
    """Inverse of :func:`voc_to_xyxy`: continuous ``xyxy`` ``(N, 4)`` to VOC inclusive boxes."""
    return torch.stack((boxes[:, 0] + 1, boxes[:, 1] + 1, boxes[:, 2], boxes[:, 3]), dim=1)
