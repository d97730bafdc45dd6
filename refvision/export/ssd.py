"""Exportable forms of a torchvision SSD on an image batch: raw head outputs, or final detections.

torchvision's ``SSD`` takes a list of images and loops over it in Python (transform, anchors,
post-processing), so neither the batch size nor the image size can stay dynamic in an exported
graph, and its post-processing has data-dependent shapes. The modules here compute the same
thing on a ``(B, 3, H, W)`` batch with batch-wide tensor ops: the transform (normalise, then
resize to the model's fixed size), backbone and head; and, in :class:`BatchSSDDetections`, torchvision's
``postprocess_detections`` and box rescaling with fixed-shape outputs padded to
``detections_per_img``. The anchors depend only on the fixed size, so they are computed once here.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD
from torchvision.ops import boxes as box_ops

from refvision.export.nms import multiclass_nms


class BatchSSDRaw(nn.Module):
    """``(B, 3, H, W)`` RGB in [0, 1] -> the pre-NMS outputs ``(B, A * (4 + C))`` of ``model``.

    The output concatenates the box regression ``(B, A, 4)`` and the class logits ``(B, A, C)`` of
    the ``A`` anchors, each flattened per image: what ``refvision.models.detection.ssd_raw_outputs``
    gives for the same images.
    """

    def __init__(self, model: SSD) -> None:
        super().__init__()
        self.model = model
        transform = model.transform
        self.size: tuple[int, int] = tuple(transform.fixed_size)[::-1]  # torchvision keeps (width, height)
        self.register_buffer("mean", torch.tensor(transform.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(transform.image_std).view(1, 3, 1, 1), persistent=False)

    def head_outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Box regression ``(B, A, 4)`` and class logits ``(B, A, C)`` of ``images`` ``(B, 3, H, W)``."""
        x = F.interpolate((images - self.mean) / self.std, size=self.size, mode="bilinear", align_corners=False)
        outputs = self.model.head(list(self.model.backbone(x).values()))
        return outputs["bbox_regression"], outputs["cls_logits"]

    def forward(self, images: Tensor) -> Tensor:
        regression, logits = self.head_outputs(images)
        return torch.cat([regression.flatten(1), logits.flatten(1)], 1)


class BatchSSDDetections(BatchSSDRaw):
    """``(B, 3, H, W)`` RGB in [0, 1] -> ``model``'s detections, padded to a fixed count per image.

    Outputs, with ``D = min(detections_per_img, (C - 1) * A)``:

    - ``boxes`` ``(B, D, 4)`` float: xyxy in the input's pixels;
    - ``scores`` ``(B, D)`` float, in decreasing order;
    - ``labels`` ``(B, D)`` int64 in ``1..C - 1``;
    - ``num_detections`` ``(B,)`` int64: image ``i``'s detections are the first ``num_detections[i]``
      rows; the rest are zeros (label 0, the background, is never a detection).

    The first ``num_detections[i]`` rows are what ``model.eval()([image_i])`` gives for each image: softmax
    scores, boxes decoded from the anchors and clipped to the resized image, per class the
    ``topk_candidates`` best boxes scoring above ``score_thresh``, per-class NMS at ``nms_thresh``,
    the ``detections_per_img`` best kept, boxes scaled back to the input size.
    """

    def __init__(self, model: SSD) -> None:
        super().__init__(model)
        height, width = self.size
        with torch.no_grad():
            x = torch.zeros(1, 3, height, width)
            features = list(model.backbone(x).values())
            anchors = model.anchor_generator(ImageList(x, [(height, width)]), features)[0]
        self.register_buffer("anchors", anchors, persistent=False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ssd = self.model
        batch, _, height, width = images.shape
        regression, logits = self.head_outputs(images)
        anchors = self.anchors.shape[0]
        boxes = ssd.box_coder.decode_single(regression.reshape(-1, 4), self.anchors.repeat(batch, 1))
        boxes = box_ops.clip_boxes_to_image(boxes.reshape(batch, anchors, 4), self.size)
        scores = F.softmax(logits, dim=-1)[..., 1:].transpose(1, 2)  # (B, C - 1, A): the foreground classes

        # Each class's topk_candidates best boxes, then those above the threshold: the same set as
        # torchvision's threshold-then-top-k.
        candidates = min(ssd.topk_candidates, anchors)
        best = torch.zeros_like(scores).scatter(-1, scores.topk(candidates, dim=-1).indices, 1.0)
        scores = torch.where(best > 0, scores, -1.0)
        keep = multiclass_nms(boxes, scores, ssd.nms_thresh, ssd.score_thresh, candidates)
        kept = torch.where(keep > 0, scores, -1.0).flatten(1)  # (B, (C - 1) * A), class-major

        top_scores, index = kept.topk(min(ssd.detections_per_img, kept.shape[1]), dim=1)
        valid = top_scores > ssd.score_thresh
        labels = torch.where(valid, index // anchors + 1, 0)
        top_boxes = torch.gather(boxes, 1, (index % anchors).unsqueeze(-1).expand(-1, -1, 4))
        # torchvision's resize_boxes: float32 ratios of the input size to the resized one.
        scale = torch.tensor([width, height, width, height], dtype=torch.float32) / torch.tensor(
            [self.size[1], self.size[0]] * 2, dtype=torch.float32
        )
        top_boxes = torch.where(valid.unsqueeze(-1), top_boxes * scale.to(top_boxes.dtype), 0.0)
        return top_boxes, torch.where(valid, top_scores, 0.0), labels, valid.sum(1)


def detection_gaps(expected: list[Tensor], got: list[Tensor]) -> list[float]:
    """The largest difference in each output of two :class:`BatchSSDDetections` results on the same images.

    Each image's detections are matched by label and box, not by row: detections whose scores tie
    to rounding may come in either order. ``inf`` for ``labels`` where they cannot be matched one to
    one (a label or a count differs); the padding rows must agree row by row.
    """
    boxes, scores, labels, counts = expected
    got_boxes, got_scores, got_labels, got_counts = got
    gaps = [0.0, 0.0, 0.0, float((counts - got_counts).abs().max())]
    if gaps[3] > 0:
        return [*gaps[:2], math.inf, gaps[3]]
    for image, count in enumerate(counts.tolist()):
        cost = (boxes[image, :count, None] - got_boxes[image, None, :count]).abs().amax(-1)
        cost[labels[image, :count, None] != got_labels[image, None, :count]] = math.inf
        match = cost.argmin(1) if count else cost.new_zeros(0, dtype=torch.long)
        matched = cost[torch.arange(count), match]
        if len(set(match.tolist())) < count or bool(torch.isinf(matched).any()):
            gaps[2] = math.inf
        padding = [(a[image, count:] - b[image, count:]).abs() for a, b in zip(expected[:3], got[:3])]
        image_gaps = [
            torch.cat([matched, padding[0].flatten()]),
            torch.cat([(scores[image, :count] - got_scores[image, match]).abs(), padding[1]]),
            padding[2].float(),
        ]
        gaps[:3] = [_nan_max(g, float(t.max()) if t.numel() else 0.0) for g, t in zip(gaps, image_gaps)]
    return gaps


def _nan_max(a: float, b: float) -> float:
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)
