"""Per-class non-maximum suppression over a batch, as one operator with a fixed-shape result.

``torch.ops.refvision.multiclass_nms`` runs torchvision's ``nms`` per image and class in PyTorch
and exports to ONNX as one ``NonMaxSuppression`` node (which is per batch and class already)
followed by a ``ScatterND`` into the fixed-shape keep mask. A fixed shape keeps the graph around
it free of data-dependent sizes, so ``torch.export`` needs no unbacked symbols.
"""

from collections.abc import Callable

import torch
from torch import Tensor
from torchvision.ops import nms


@torch.library.custom_op("refvision::multiclass_nms", mutates_args=())
def multiclass_nms(
    boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float, max_per_class: int
) -> Tensor:
    """Keep mask ``(B, C, N)`` float (1: kept, 0: not) of greedy NMS per image and class.

    Args:
        boxes: ``(B, N, 4)`` xyxy boxes, shared by the ``C`` classes of an image.
        scores: ``(B, C, N)`` score of each box for each class; only boxes scoring above
            ``score_threshold`` take part.
        iou_threshold: a box is suppressed by a kept, higher-scoring box of its class whose IoU
            with it is above this.
        max_per_class: at most this many boxes are kept per image and class (the highest-scoring).

    The rule is torchvision's ``batched_nms`` (and ONNX ``NonMaxSuppression``) for each class.
    """
    keep = torch.zeros_like(scores)
    for image in range(scores.shape[0]):
        for cls in range(scores.shape[1]):
            candidates = torch.where(scores[image, cls] > score_threshold)[0]
            kept = nms(boxes[image, candidates], scores[image, cls, candidates], iou_threshold)[:max_per_class]
            keep[image, cls, candidates[kept]] = 1.0
    return keep


@multiclass_nms.register_fake
def _(boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float, max_per_class: int) -> Tensor:
    return torch.empty_like(scores)


def onnx_translations() -> dict[Callable, Callable]:
    """``custom_translation_table`` entries of ``torch.onnx.export(dynamo=True)`` for the operators here."""
    from onnxscript import opset18 as op  # the ONNX export extra; imported only when exporting

    # ONNX Script traces this with its own symbolic tensor values for boxes and scores.
    def multiclass_nms_onnx(boxes, scores, iou_threshold: float, score_threshold: float, max_per_class: int):
        selected = op.NonMaxSuppression(  # (K, 3): image, class, box of each kept box
            boxes,
            scores,
            op.Constant(value_ints=[max_per_class]),
            op.Constant(value_floats=[iou_threshold]),
            op.Constant(value_floats=[score_threshold]),
        )
        kept = op.Expand(op.Constant(value_float=1.0), op.Slice(op.Shape(selected), [0], [1]))
        return op.ScatterND(op.ConstantOfShape(op.Shape(scores)), selected, kept)

    return {torch.ops.refvision.multiclass_nms.default: multiclass_nms_onnx}
