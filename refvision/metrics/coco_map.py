"""COCO detection metrics: pycocotools' ``COCOeval`` (bbox) on the data's own image and category ids.

The metric collects, per image, the model's detections and the image's ground truth as its
annotation file holds it (COCO's ``[x, y, w, h]`` boxes, ``area``, ``iscrowd`` and annotation
ids, the order kept), rebuilds the two as pycocotools ``COCO`` objects (the detections through
``COCO.loadRes``, as a results file is loaded) and runs ``COCOeval`` with its default
parameters. Evaluating every image of an annotation file so gives the numbers of
``COCOeval(COCO(file), COCO(file).loadRes(results.json), "bbox")`` exactly. pycocotools' rules
apply unchanged: crowd boxes (``iscrowd: 1``) are ignore regions (a detection matched to one is
neither a true nor a false positive, overlap with one is intersection over the detection's area),
the small / medium / large ranges read the annotations' ``area``, and at most 100 detections
per image and category count.

Only the images seen are evaluated (``COCOeval``'s image ids are theirs); an image seen twice
(a distributed sampler pads its last batches with repeated samples) counts once.
"""

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor
from torchmetrics import Metric

from refvision.metrics.box_states import cat_state, checked_vector, mean_defined

COCO_STATS = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)
"""The names of ``COCOeval.stats`` in its order: AP@[.5:.95], AP@.5, AP@.75, AP small / medium / large,
AR with 1, 10, 100 detections per image, AR small / medium / large."""

_STATES = (
    "image_ids",
    "det_boxes",
    "det_scores",
    "det_labels",
    "det_counts",
    "gt_bbox",
    "gt_labels",
    "gt_iscrowd",
    "gt_area",
    "gt_ids",
    "gt_counts",
)


class COCOMeanAveragePrecision(Metric):
    """pycocotools' bbox ``COCOeval`` over the images seen (see the module docstring).

    Args:
        category_ids: the data's category id of each foreground label: label ``i`` (1-based, 0 is
            the background) is ``category_ids[i - 1]``; every declared category, as ``COCOeval``
            evaluates every category of the annotation file.
        class_names: one name per foreground label, kept for per-class tables; ``None``: by label.
        kwargs: passed to :class:`torchmetrics.Metric`.

    States are flat ``float64`` tensors gathered with ``"cat"`` with per-image counts (ids and
    coordinates stay exact), so images keep their boundaries whatever the number of processes.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    image_ids: list[Tensor]
    det_boxes: list[Tensor]
    det_scores: list[Tensor]
    det_labels: list[Tensor]
    det_counts: list[Tensor]
    gt_bbox: list[Tensor]
    gt_labels: list[Tensor]
    gt_iscrowd: list[Tensor]
    gt_area: list[Tensor]
    gt_ids: list[Tensor]
    gt_counts: list[Tensor]

    def __init__(self, category_ids: Sequence[int], class_names: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not category_ids:
            raise ValueError("category_ids: expected at least one category id")
        if len(set(category_ids)) != len(category_ids):
            raise ValueError(f"category_ids: expected distinct ids, got {list(category_ids)}")
        if class_names is not None and len(class_names) != len(category_ids):
            raise ValueError(
                f"class_names: expected {len(category_ids)} names, one per category, got {len(class_names)}"
            )
        self.category_ids = tuple(int(i) for i in category_ids)
        self.class_names = tuple(class_names) if class_names is not None else None
        for name in _STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    @property
    def num_classes(self) -> int:
        """The number of foreground labels (categories)."""
        return len(self.category_ids)

    def update(self, preds: list[dict[str, Tensor]], targets: list[dict[str, Any]]) -> None:
        """Add one batch of images.

        Args:
            preds: per image ``boxes`` ``(D, 4)`` float ``xyxy`` (0-based continuous pixels),
                ``scores`` ``(D,)`` and ``labels`` ``(D,)`` integers in ``1..num_classes``.
            targets: per image ``image_id`` (the data's integer id), and its annotations as the
                file holds them: ``bbox`` ``(M, 4)`` ``[x, y, w, h]``, ``labels`` ``(M,)`` in
                ``1..num_classes``, ``iscrowd`` ``(M,)`` bool, ``area`` ``(M,)`` and
                ``annotation_id`` ``(M,)`` integers (the COCO evaluation targets of
                :class:`~refvision.data.coco.CocoDetection`).

        Raises:
            ValueError: naming the image index, the key and what was expected.
        """
        if not isinstance(preds, Sequence) or not isinstance(targets, Sequence) or len(preds) != len(targets):
            raise ValueError(
                "preds, targets: expected two lists of dicts with one entry per image, got "
                f"{type(preds).__name__} and {type(targets).__name__}"
                + (f" of {len(preds)} and {len(targets)}" if isinstance(preds, Sequence) else "")
            )
        for i, (pred, target) in enumerate(zip(preds, targets)):
            boxes = _boxes(pred, "preds", i, "boxes")
            if ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
                raise ValueError(f"preds[{i}]['boxes']: expected xyxy with x2 >= x1 and y2 >= y1")
            scores = checked_vector(pred, "preds", i, "scores", len(boxes))
            labels = self._labels(pred, "preds", i, len(boxes))
            bbox = _boxes(target, "targets", i, "bbox")
            gt_labels = self._labels(target, "targets", i, len(bbox))
            iscrowd = checked_vector(target, "targets", i, "iscrowd", len(bbox))
            area = checked_vector(target, "targets", i, "area", len(bbox))
            annotation_ids = checked_vector(target, "targets", i, "annotation_id", len(bbox))
            image_id = target.get("image_id")
            if isinstance(image_id, Tensor) and image_id.numel() == 1 and not image_id.is_floating_point():
                image_id = int(image_id)
            if not isinstance(image_id, int) or isinstance(image_id, bool):
                raise ValueError(f"targets[{i}]['image_id']: expected the image's integer id, got {image_id!r}")
            xywh = torch.cat((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), dim=1) if len(boxes) else boxes
            self.image_ids.append(torch.tensor([image_id], dtype=torch.float64, device=self.device))
            self.det_boxes.append(xywh.to(torch.float64).flatten())
            self.det_scores.append(scores.to(torch.float64))
            self.det_labels.append(labels.to(torch.float64))
            self.det_counts.append(torch.tensor([len(boxes)], dtype=torch.float64, device=self.device))
            self.gt_bbox.append(bbox.to(torch.float64).flatten())
            self.gt_labels.append(gt_labels.to(torch.float64))
            self.gt_iscrowd.append(iscrowd.to(torch.float64))
            self.gt_area.append(area.to(torch.float64))
            self.gt_ids.append(annotation_ids.to(torch.float64))
            self.gt_counts.append(torch.tensor([len(bbox)], dtype=torch.float64, device=self.device))

    def _labels(self, item: dict[str, Any], arg: str, i: int, length: int) -> Tensor:
        labels = checked_vector(item, arg, i, "labels", length)
        if labels.is_floating_point():
            raise ValueError(f"{arg}[{i}]['labels']: expected an integer tensor, got {labels.dtype}")
        if len(labels) and (labels.min() < 1 or labels.max() > self.num_classes):
            raise ValueError(
                f"{arg}[{i}]['labels']: expected values in 1..{self.num_classes} (0 is background), "
                f"got min {labels.min().item()} max {labels.max().item()}"
            )
        return labels

    def compute(self) -> dict[str, Any]:
        """Run ``COCOeval`` on everything seen since the last reset.

        Returns:
            ``float64`` CPU tensors: each of :data:`COCO_STATS` (``COCOeval.stats``; its -1, "no
            ground truth", becomes NaN), ``ap_per_class`` ``(num_classes,)`` (AP@[.5:.95], area all,
            100 detections; NaN for a category without ground truth) and ``ap50_per_class`` (the
            same at IoU 0.5); and ``pr_curves``, per class the ``(2, 101)`` recall thresholds (row 0)
            and precision at IoU 0.5 (row 1) the AP@.5 averages, ``(2, 0)`` without ground truth.
        """
        evaluator = self.evaluator()
        stats = [float("nan") if value == -1 else float(value) for value in evaluator.stats]
        result: dict[str, Any] = {
            name: torch.tensor(value, dtype=torch.float64) for name, value in zip(COCO_STATS, stats)
        }
        # (IoU thresholds, recall thresholds, categories, area ranges, max detections); area "all", 100 detections.
        precision = np.asarray(evaluator.eval["precision"])[:, :, :, 0, -1]
        at_50 = precision[np.flatnonzero(evaluator.params.iouThrs == 0.5)[0]]  # as COCOeval.summarize finds it
        result["ap_per_class"] = torch.tensor(
            [mean_defined(precision[:, :, k]) for k in range(self.num_classes)], dtype=torch.float64
        )
        result["ap50_per_class"] = torch.tensor(
            [mean_defined(at_50[:, k]) for k in range(self.num_classes)], dtype=torch.float64
        )
        recall = torch.tensor(evaluator.params.recThrs, dtype=torch.float64)
        result["pr_curves"] = [
            torch.stack((recall, torch.tensor(at_50[:, k], dtype=torch.float64)))
            if (at_50[:, k] > -1).all()
            else torch.empty(2, 0, dtype=torch.float64)
            for k in range(self.num_classes)
        ]
        return result

    def evaluator(self) -> COCOeval:
        """The ``COCOeval`` (evaluated, accumulated and summarised) of everything seen since the last reset."""
        states = {name: cat_state(getattr(self, name), torch.float64) for name in _STATES}
        image_ids = states["image_ids"].long().tolist()
        det_counts, gt_counts = states["det_counts"].long().tolist(), states["gt_counts"].long().tolist()
        det_boxes = states["det_boxes"].view(-1, 4).numpy().tolist()
        det_scores, det_labels = states["det_scores"].tolist(), states["det_labels"].long().tolist()
        gt_bbox = states["gt_bbox"].view(-1, 4).numpy().tolist()
        gt_labels, gt_ids = states["gt_labels"].long().tolist(), states["gt_ids"].long().tolist()
        gt_iscrowd, gt_area = states["gt_iscrowd"].long().tolist(), states["gt_area"].tolist()

        detections: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        seen: set[int] = set()
        det_start = gt_start = 0
        for image_id, num_dets, num_gts in zip(image_ids, det_counts, gt_counts):
            dets, gts = range(det_start, det_start + num_dets), range(gt_start, gt_start + num_gts)
            det_start, gt_start = det_start + num_dets, gt_start + num_gts
            if image_id in seen:
                continue
            seen.add(image_id)
            detections += [
                {
                    "image_id": image_id,
                    "category_id": self.category_ids[det_labels[d] - 1],
                    "bbox": det_boxes[d],
                    "score": det_scores[d],
                }
                for d in dets
            ]
            annotations += [
                {
                    "id": gt_ids[g],
                    "image_id": image_id,
                    "category_id": self.category_ids[gt_labels[g] - 1],
                    "bbox": gt_bbox[g],
                    "area": gt_area[g],
                    "iscrowd": gt_iscrowd[g],
                }
                for g in gts
            ]
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            ground_truth = COCO()
            ground_truth.dataset = {
                "images": [{"id": image_id} for image_id in sorted(seen)],
                "categories": [{"id": category_id} for category_id in self.category_ids],
                "annotations": annotations,
            }
            ground_truth.createIndex()
            if detections:
                results = ground_truth.loadRes(detections)
            else:  # loadRes cannot take an empty list; no detection is a results set without annotations
                results = COCO()
                results.dataset = {**ground_truth.dataset, "annotations": []}
                results.createIndex()
            evaluator = COCOeval(ground_truth, results, iouType="bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        return evaluator


def _boxes(item: dict[str, Any], arg: str, i: int, key: str) -> Tensor:
    if not isinstance(item, dict):
        raise ValueError(f"{arg}[{i}]: expected a dict, got {type(item).__name__}")
    boxes = item.get(key)
    if not isinstance(boxes, Tensor) or boxes.ndim != 2 or boxes.shape[1] != 4:
        got = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise ValueError(f"{arg}[{i}]['{key}']: expected a tensor of shape (N, 4), got {got}")
    if not torch.isfinite(boxes).all():
        raise ValueError(f"{arg}[{i}]['{key}']: expected finite values")
    return boxes
