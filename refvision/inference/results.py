"""The typed result of one image, per task, built from the task's ``predict_step`` outputs.

Every tensor is on the CPU. Coordinates and sizes are those of the image as given (a file as it is
displayed, EXIF orientation applied), whatever the network resized it to.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor


class ClassScore(NamedTuple):
    """One class of a classification: its ``label`` (index), ``name`` and softmax ``prob``."""

    label: int
    name: str
    prob: float


@dataclass(frozen=True)
class ClassificationResult:
    """``top_k``: the ``k = min(5, num_classes)`` most probable classes, most probable first (the
    classes and probabilities of a ``refvision predict`` CSV row)."""

    top_k: tuple[ClassScore, ...]


@dataclass(frozen=True, eq=False)
class DetectionResult:
    """The detections of one image with score at or above the predictor's ``score_threshold``, by
    descending score (the record of ``refvision predict``'s ``detections.json``, unrounded).

    ``boxes`` ``(D, 4)`` float32 xyxy in the image's pixels (0-based, continuous), ``scores`` ``(D,)``,
    ``labels`` ``(D,)`` int64 (``1..num_classes - 1``; 0 is the background), ``class_names`` the name of
    each detection's label (its number where the checkpoint has no names).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.scores)


@dataclass(frozen=True, eq=False)
class SegmentationResult:
    """``mask`` ``(H, W)`` uint8: the predicted class index of every pixel, at the image's size (what
    ``refvision predict`` writes to ``labels/<name>.png``); ``class_names[c]`` and ``palette[c]``
    (``(num_classes, 3)`` uint8 RGB) name and colour class ``c``."""

    mask: Tensor
    class_names: tuple[str, ...]
    palette: Tensor

    def color_image(self) -> Tensor:
        """``(3, H, W)`` uint8: every pixel in its class's colour (``refvision predict``'s ``color/<name>.png``)."""
        return self.palette[self.mask.long()].permute(2, 0, 1).contiguous()


def classification_results(outputs: dict[str, Tensor], names: Sequence[str]) -> list[ClassificationResult]:
    """One result per image of :meth:`ClassificationTask.predict_step`'s ``{"classes": (B, k), "probs": (B, k)}``;
    ``names[label]`` names each label."""
    classes, probs = outputs["classes"].cpu().tolist(), outputs["probs"].double().cpu().tolist()
    return [
        ClassificationResult(tuple(ClassScore(c, names[c], p) for c, p in zip(row, row_probs)))
        for row, row_probs in zip(classes, probs)
    ]


def detection_results(
    outputs: Sequence[dict[str, Any]], names: Sequence[str], score_threshold: float
) -> list[DetectionResult]:
    """One result per image of :meth:`DetectionTask.predict_step`'s detections, those with
    ``score >= score_threshold`` kept; ``names[label]`` names each label (background first)."""
    results = []
    for detection in outputs:
        keep = detection["scores"] >= score_threshold
        boxes, scores, labels = (detection[key][keep].cpu() for key in ("boxes", "scores", "labels"))
        results.append(DetectionResult(boxes, scores, labels, tuple(names[i] for i in labels.tolist())))
    return results


def segmentation_results(outputs: Sequence[Tensor], names: Sequence[str], palette: Tensor) -> list[SegmentationResult]:
    """One result per class-index map of :meth:`SegmentationTask.predict_step`."""
    palette = palette.cpu().to(torch.uint8)
    return [SegmentationResult(mask.cpu(), tuple(names), palette) for mask in outputs]
