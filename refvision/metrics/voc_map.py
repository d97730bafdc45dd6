"""Pascal VOC mean average precision (devkit rules), with COCO mAP (pycocotools' rules) alongside.

Matching follows the VOC devkit (``VOCevaldet.m``; ``voc_eval.py`` of py-faster-rcnn):

* per class, detections are processed by descending score; each takes the ground truth box
  of its class in its image with the largest IoU (the first one on equal IoU);
* if that IoU is strictly above ``iou_threshold``: a difficult box makes the detection
  ignored (neither true nor false positive), an unclaimed box makes it a true positive and
  claims the box, a claimed box makes it a false positive (duplicate); otherwise it is a
  false positive. A detection never falls back to its second-best box;
* IoU is computed the devkit way, on VOC inclusive boxes with the ``+1`` width rule
  (boxes go through :func:`~refvision.data.voc_format.xyxy_to_voc` first).

Rules that the devkit leaves to the order of its input file, decided here so that the
result does not depend on how images were split across processes or in which order they
arrived:

* Ties in score. Detections with equal scores enter the precision/recall curve together:
  the curve has one point per distinct score, taken after all detections holding it (the
  devkit adds one point per detection in file order, so its AP on tied scores depends on
  that order). As a detection never falls back to its second-best box, the counts after
  a tie group do not depend on the order inside it either; the sort is stable anyway
  (tied detections are matched in input order). Without ties both rules give the devkit's
  numbers exactly.
* Classes without any non-difficult ground truth have no recall; their AP is NaN and they
  are left out of the mean (the devkit divides by zero there).

The 11-point thresholds are ``np.arange(0, 1.1, 0.1)`` (``i * 0.1``, floating point quirks
included: a recall of exactly 0.3 does not reach the threshold ``0.30000000000000004``), as
in py-faster-rcnn and MMDetection.

COCO numbers (``coco=True``) come from ``faster-coco-eval``'s ``COCOeval_faster`` (a C++
port of pycocotools' ``COCOeval``, the same numbers to 1e-6, tested against pycocotools, about
20x faster on VOC07 test) run on the same boxes (0-based continuous ``xywh``, no ``+1``).
Difficult boxes are given ``iscrowd=1``: for boxes
pycocotools overwrites any ``ignore`` field with ``iscrowd`` (``COCOeval._prepare``), so a
crowd flag is its only way to ignore a ground truth. Consequences, as in COCO: a detection
prefers any eligible regular box to a crowd box, overlap with a crowd box is intersection
over the detection's area, and a crowd box may absorb several detections.
"""

import contextlib
import io
from collections.abc import Sequence

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster
from torch import Tensor
from torchmetrics import Metric

from refvision.data.voc_format import xyxy_to_voc
from refvision.metrics.box_states import cat_state, checked_vector, mean_defined

EVAL_MODES = ("11points", "area")

# Detection x ground-truth pairs examined per vectorized matching step (bounds memory).
_MATCH_CHUNK_PAIRS = 1 << 20


class VOCMeanAveragePrecision(Metric):
    """Pascal VOC mAP at one IoU threshold, plus COCO mAP@[.5:.95] and mAP@.5 if ``coco``.

    Args:
        num_classes: number of foreground classes; labels run ``1..num_classes`` (0 is
            background, as in torchvision detectors).
        class_names: one name per foreground class (the data's, passed in by the caller), kept
            for per-class tables; ``None``: the classes are known by their labels only.
        eval_mode: ``"11points"`` (VOC2007, as in the SSD paper) or ``"area"`` (VOC2010+
            all-points interpolation).
        iou_threshold: a detection matches a ground truth box only if IoU is strictly above it.
        coco: also compute COCO mAP through pycocotools.
        kwargs: passed to :class:`torchmetrics.Metric`.

    All states are flat floating point tensors gathered with ``"cat"`` together with
    per-image counts, so images keep their boundaries whatever the number of processes.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    det_boxes: list[Tensor]
    det_scores: list[Tensor]
    det_labels: list[Tensor]
    det_counts: list[Tensor]
    gt_boxes: list[Tensor]
    gt_labels: list[Tensor]
    gt_difficult: list[Tensor]
    gt_counts: list[Tensor]

    def __init__(
        self,
        num_classes: int = 20,
        class_names: Sequence[str] | None = None,
        eval_mode: str = "11points",
        iou_threshold: float = 0.5,
        coco: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names: expected {num_classes} names, got {len(class_names)}")
        if eval_mode not in EVAL_MODES:
            raise ValueError(f"eval_mode: expected one of {EVAL_MODES}, got {eval_mode!r}")
        if not 0.0 <= iou_threshold < 1.0:
            raise ValueError(f"iou_threshold: expected a value in [0, 1), got {iou_threshold}")
        self.num_classes = num_classes
        self.class_names = tuple(class_names) if class_names is not None else None
        self.eval_mode = eval_mode
        self.iou_threshold = iou_threshold
        self.coco = coco
        # Every state is 1-D in the metric dtype (boxes flattened, labels and counts as exact
        # small floats): torchmetrics fills the state of a process that saw no image with a
        # 1-D empty tensor of that dtype, and all_gather needs one dtype and rank everywhere.
        for name in (
            "det_boxes",
            "det_scores",
            "det_labels",
            "det_counts",
            "gt_boxes",
            "gt_labels",
            "gt_difficult",
            "gt_counts",
        ):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, preds: list[dict[str, Tensor]], targets: list[dict[str, Tensor]]) -> None:
        """Add one batch of images.

        Args:
            preds: per image ``boxes`` ``(N, 4)`` float ``xyxy`` (0-based continuous, see
                :mod:`refvision.data.voc_format`), ``scores`` ``(N,)``, ``labels`` ``(N,)``
                integers in ``1..num_classes``.
            targets: per image ``boxes`` ``(M, 4)``, ``labels`` ``(M,)`` in
                ``1..num_classes``, optional ``difficult`` ``(M,)`` bool (default all False).

        Raises:
            ValueError: naming the image index, the key and what was expected.
        """
        if not isinstance(preds, Sequence) or not isinstance(targets, Sequence):
            raise ValueError(
                f"preds, targets: expected lists of dicts, got {type(preds).__name__} and {type(targets).__name__}"
            )
        if len(preds) != len(targets):
            raise ValueError(
                f"preds, targets: expected one entry per image in both, got {len(preds)} "
                f"preds and {len(targets)} targets"
            )
        for i, (pred, target) in enumerate(zip(preds, targets)):
            boxes, labels = self._checked_boxes_labels(pred, "preds", i)
            scores = checked_vector(pred, "preds", i, "scores", len(boxes), floating=True)
            if not torch.isfinite(scores).all():
                raise ValueError(f"preds[{i}]['scores']: expected finite values")
            gt_boxes, gt_labels = self._checked_boxes_labels(target, "targets", i)
            if "difficult" in target:
                difficult = checked_vector(target, "targets", i, "difficult", len(gt_boxes))
                if ((difficult != 0) & (difficult != 1)).any():
                    raise ValueError(
                        f"targets[{i}]['difficult']: expected bool or 0/1 values, got {difficult.unique().tolist()}"
                    )
            else:
                difficult = torch.zeros(len(gt_boxes), device=gt_boxes.device)
            self.det_boxes.append(boxes.flatten().to(self.dtype))
            self.det_scores.append(scores.to(self.dtype))
            self.det_labels.append(labels.to(self.dtype))
            self.det_counts.append(torch.tensor([len(boxes)], dtype=self.dtype, device=self.device))
            self.gt_boxes.append(gt_boxes.flatten().to(self.dtype))
            self.gt_labels.append(gt_labels.to(self.dtype))
            self.gt_difficult.append(difficult.to(self.dtype))
            self.gt_counts.append(torch.tensor([len(gt_boxes)], dtype=self.dtype, device=self.device))

    def compute(self) -> dict[str, Tensor]:
        """Evaluate everything seen since the last reset.

        Returns:
            CPU float64 tensors: ``map`` (mean of ``ap_per_class`` over classes with a
            non-difficult ground truth; NaN if none), the same value under ``map_11points``
            or ``map_area``, ``ap_per_class`` ``(num_classes,)`` (NaN for classes without
            non-difficult ground truth; 0-dim for one class, as torchmetrics squeezes
            one-element results) and, if ``coco``, ``coco_map`` (mAP@[.5:.95]) and
            ``coco_map_50`` (COCO's AP at IoU 0.5; -1 from pycocotools becomes NaN).
            ``pr_curves`` lists, per class, the raw precision/recall curve the AP was computed
            from: a ``(2, P)`` tensor of recall (row 0) and precision (row 1), one point per
            distinct detection score in descending order (``(2, 0)`` without detections or
            without non-difficult ground truth).
        """
        det_boxes = cat_state(self.det_boxes).view(-1, 4)
        det_scores = cat_state(self.det_scores)
        det_labels = cat_state(self.det_labels).round().long()
        det_counts = cat_state(self.det_counts).round().long()
        gt_boxes = cat_state(self.gt_boxes).view(-1, 4)
        gt_labels = cat_state(self.gt_labels).round().long()
        gt_difficult = cat_state(self.gt_difficult) > 0.5
        gt_counts = cat_state(self.gt_counts).round().long()

        ap, curves = self._voc_ap_per_class(
            det_boxes,
            det_scores,
            det_labels,
            det_counts,
            gt_boxes,
            gt_labels,
            gt_difficult,
            gt_counts,
        )
        mean = ap.nanmean()
        result = {"map": mean, f"map_{self.eval_mode}": mean.clone(), "ap_per_class": ap, "pr_curves": curves}
        if self.coco:
            coco_map, coco_map_50 = _coco_map(
                det_boxes,
                det_scores,
                det_labels,
                det_counts,
                gt_boxes,
                gt_labels,
                gt_difficult,
                gt_counts,
                self.num_classes,
            )
            result["coco_map"] = torch.tensor(coco_map, dtype=torch.float64)
            result["coco_map_50"] = torch.tensor(coco_map_50, dtype=torch.float64)
        return result

    def _checked_boxes_labels(self, item: dict[str, Tensor], arg: str, i: int) -> tuple[Tensor, Tensor]:
        if not isinstance(item, dict):
            raise ValueError(f"{arg}[{i}]: expected a dict, got {type(item).__name__}")
        boxes = item.get("boxes")
        if not isinstance(boxes, Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4:
            got = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
            raise ValueError(f"{arg}[{i}]['boxes']: expected a tensor of shape (N, 4), got {got}")
        if not torch.isfinite(boxes).all():
            raise ValueError(f"{arg}[{i}]['boxes']: expected finite values")
        if ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
            raise ValueError(f"{arg}[{i}]['boxes']: expected xyxy with x2 >= x1 and y2 >= y1")
        labels = checked_vector(item, arg, i, "labels", len(boxes))
        if labels.is_floating_point():
            raise ValueError(f"{arg}[{i}]['labels']: expected an integer tensor, got {labels.dtype}")
        if len(labels) and (labels.min() < 1 or labels.max() > self.num_classes):
            raise ValueError(
                f"{arg}[{i}]['labels']: expected values in 1..{self.num_classes} (0 is "
                f"background), got min {labels.min().item()} max {labels.max().item()}"
            )
        return boxes, labels

    def _voc_ap_per_class(
        self,
        det_boxes: Tensor,
        det_scores: Tensor,
        det_labels: Tensor,
        det_counts: Tensor,
        gt_boxes: Tensor,
        gt_labels: Tensor,
        gt_difficult: Tensor,
        gt_counts: Tensor,
    ) -> tuple[Tensor, list[Tensor]]:
        # Global order: descending score; stable, so within an image ties keep input order.
        order = torch.sort(-det_scores.double(), stable=True).indices
        det_image = torch.repeat_interleave(torch.arange(len(det_counts)), det_counts)[order]
        det_boxes, det_scores, det_labels = det_boxes[order], det_scores[order], det_labels[order]

        true_pos, false_pos = _match(
            det_boxes,
            det_labels,
            det_image,
            gt_boxes,
            gt_labels,
            gt_difficult,
            gt_counts,
            self.iou_threshold,
        )
        num_pos = torch.bincount(gt_labels[~gt_difficult], minlength=self.num_classes + 1)[1:]
        ap = torch.full((self.num_classes,), float("nan"), dtype=torch.float64)
        curves = [torch.empty(2, 0, dtype=torch.float64) for _ in range(self.num_classes)]
        for c in range(1, self.num_classes + 1):
            if num_pos[c - 1] == 0:
                continue
            in_class = det_labels == c
            tp = true_pos[in_class].double().cumsum(0)
            fp = false_pos[in_class].double().cumsum(0)
            scores = det_scores[in_class]
            # One curve point per distinct score, after the last detection holding it.
            last_of_tie = torch.ones_like(scores, dtype=torch.bool)
            last_of_tie[:-1] = scores[1:] != scores[:-1]
            tp, fp = tp[last_of_tie], fp[last_of_tie]
            recall = tp / num_pos[c - 1].double()
            precision = tp / torch.clamp(tp + fp, min=np.finfo(np.float64).eps)
            curves[c - 1] = torch.stack((recall, precision))
            if self.eval_mode == "11points":
                ap[c - 1] = _ap_11points(recall, precision)
            else:
                ap[c - 1] = _ap_area(recall, precision)
        return ap, curves


def _devkit_iou(det: Tensor, gt: Tensor) -> Tensor:
    """IoU of VOC inclusive boxes, the devkit's ``+1`` formula, broadcasting ``(..., 4)``."""
    iw = (torch.minimum(det[..., 2], gt[..., 2]) - torch.maximum(det[..., 0], gt[..., 0]) + 1.0).clamp(min=0.0)
    ih = (torch.minimum(det[..., 3], gt[..., 3]) - torch.maximum(det[..., 1], gt[..., 1]) + 1.0).clamp(min=0.0)
    inters = iw * ih
    union = (
        (det[..., 2] - det[..., 0] + 1.0) * (det[..., 3] - det[..., 1] + 1.0)
        + (gt[..., 2] - gt[..., 0] + 1.0) * (gt[..., 3] - gt[..., 1] + 1.0)
        - inters
    )
    return inters / union


def _match(
    det_boxes: Tensor,
    det_labels: Tensor,
    det_image: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_difficult: Tensor,
    gt_counts: Tensor,
    iou_threshold: float,
) -> tuple[Tensor, Tensor]:
    """Devkit greedy matching of detections given in processing order.

    Since a detection only ever considers its best box, "greedy" reduces to: a detection
    whose best box is eligible is a true positive iff it is the first such detection of
    that box in processing order.

    Returns:
        ``(true_pos, false_pos)``, bool ``(D,)`` each; ignored detections are in neither.
    """
    num_dets = len(det_boxes)
    true_pos = torch.zeros(num_dets, dtype=torch.bool)
    false_pos = torch.ones(num_dets, dtype=torch.bool)
    if num_dets == 0 or len(gt_boxes) == 0:
        return true_pos, false_pos

    det_voc = xyxy_to_voc(det_boxes.double())
    gt_voc = xyxy_to_voc(gt_boxes.double())
    gt_start = torch.cumsum(gt_counts, 0) - gt_counts
    max_gts = int(gt_counts.max())
    slots = torch.arange(max_gts)
    best_iou = torch.empty(num_dets, dtype=torch.float64)
    best_gt = torch.empty(num_dets, dtype=torch.long)
    chunk = max(1, _MATCH_CHUNK_PAIRS // max_gts)
    for start in range(0, num_dets, chunk):
        part = slice(start, start + chunk)
        image = det_image[part]
        # Each detection faces its image's ground truth, padded to max_gts slots.
        gt_index = gt_start[image, None] + slots
        eligible = slots < gt_counts[image, None]
        gt_index = torch.where(eligible, gt_index, 0)
        eligible &= gt_labels[gt_index] == det_labels[part, None]
        iou = _devkit_iou(det_voc[part, None, :], gt_voc[gt_index])
        iou = torch.where(eligible, iou, -1.0)
        # max over dim returns the first maximal index, as numpy's argmax in the devkit.
        best_iou[part], slot = iou.max(dim=1)
        best_gt[part] = gt_index.gather(1, slot[:, None]).squeeze(1)

    hit = best_iou > iou_threshold
    ignored = hit & gt_difficult[best_gt]
    claims = hit & ~ignored
    position = torch.arange(num_dets)
    first_claim = torch.full((len(gt_boxes),), num_dets, dtype=torch.long)
    first_claim.scatter_reduce_(0, best_gt[claims], position[claims], reduce="amin")
    true_pos = claims & (first_claim[best_gt] == position)
    false_pos = ~true_pos & ~ignored
    return true_pos, false_pos


def _ap_11points(recall: Tensor, precision: Tensor) -> Tensor:
    """Mean over ``t = 0, 0.1, ..., 1`` of the max precision at recall >= t (0 if none)."""
    thresholds = torch.arange(11, dtype=torch.float64) * 0.1
    if len(recall) == 0:
        return torch.tensor(0.0, dtype=torch.float64)
    # Recall never decreases along the curve: the max over recall >= t is a suffix max.
    envelope = precision.flip(0).cummax(0).values.flip(0)
    first = torch.searchsorted(recall, thresholds)
    reached = first < len(recall)
    best = torch.where(reached, envelope[first.clamp(max=len(recall) - 1)], 0.0)
    return best.sum() / 11.0


def _ap_area(recall: Tensor, precision: Tensor) -> Tensor:
    """Area under the monotone precision envelope (VOC2010+ all-points interpolation)."""
    zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    mrec = torch.cat((zero, recall, one))
    mpre = torch.cat((zero, precision, zero))
    envelope = mpre.flip(0).cummax(0).values.flip(0)
    return ((mrec[1:] - mrec[:-1]) * envelope[1:]).sum()


def _coco_map(
    det_boxes: Tensor,
    det_scores: Tensor,
    det_labels: Tensor,
    det_counts: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_difficult: Tensor,
    gt_counts: Tensor,
    num_classes: int,
) -> tuple[float, float]:
    """COCO mAP@[.5:.95] and mAP@.5 (pycocotools' rules), difficult boxes as crowd regions."""
    images = [{"id": i} for i in range(len(gt_counts))]
    categories = [{"id": c} for c in range(1, num_classes + 1)]
    gt_image = torch.repeat_interleave(torch.arange(len(gt_counts)), gt_counts).cpu().numpy().tolist()
    det_image = torch.repeat_interleave(torch.arange(len(det_counts)), det_counts).cpu().numpy().tolist()
    gt_xywh = _xywh(gt_boxes)
    det_xywh = _xywh(det_boxes)
    # Annotation ids start at 1: COCOeval uses id 0 to mean "unmatched".
    gt_annotations = [
        {
            "id": k + 1,
            "image_id": image,
            "category_id": label,
            "bbox": box,
            "area": box[2] * box[3],
            "iscrowd": int(crowd),
        }
        for k, (image, label, box, crowd) in enumerate(
            zip(gt_image, gt_labels.cpu().numpy().tolist(), gt_xywh, gt_difficult.cpu().numpy().tolist())
        )
    ]
    det_annotations = [
        {
            "id": k + 1,
            "image_id": image,
            "category_id": label,
            "bbox": box,
            "area": box[2] * box[3],
            "iscrowd": 0,
            "score": score,
        }
        for k, (image, label, box, score) in enumerate(
            zip(det_image, det_labels.cpu().numpy().tolist(), det_xywh, det_scores.double().cpu().numpy().tolist())
        )
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt, coco_dt = COCO(), COCO()
        coco_gt.dataset = {"images": images, "categories": categories, "annotations": gt_annotations}
        coco_dt.dataset = {"images": images, "categories": categories, "annotations": det_annotations}
        coco_gt.createIndex()
        coco_dt.createIndex()
        evaluator = COCOeval_faster(coco_gt, coco_dt, iouType="bbox")
        # Only the two numbers reported: area "all" (pycocotools' [0, 1e5 ** 2]) at 100
        # detections, so the small / medium / large passes and the 1 / 10 caps are skipped.
        params = evaluator.params
        params.areaRng, params.areaRngLbl, params.maxDets = [[0.0, 1e5**2]], ["all"], [100]
        evaluator.evaluate()
        evaluator.accumulate()
    # pycocotools' COCOeval.summarize: the mean over the precisions that exist (> -1), -1 if none.
    precision = np.asarray(evaluator.eval["precision"])[..., 0, 0]  # (IoU, recall, class)
    at_50 = precision[np.isclose(params.iouThrs, 0.5)]
    return mean_defined(precision), mean_defined(at_50)


def _xywh(boxes: Tensor) -> list[list[float]]:
    boxes = boxes.double()
    # numpy's tolist is several times faster than torch's on 10^5-10^6 boxes.
    return torch.cat((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), dim=1).cpu().numpy().tolist()
