"""VOC mAP (with its COCO numbers) vs torchmetrics' MeanAveragePrecision on a VOC07-test-sized set.

Both metrics get the same generated detections and ground truth (default: 4,952 images, 100
detections each, 20 classes, about 2.4 objects per image, 1 in 8 difficult, as VOC07 test);
the script times ``update`` + ``compute`` of each, once, and prints the ratio.

    python benchmarks/eval_speed.py [--images 4952] [--detections 100] [--no-coco]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision

from refvision.metrics.voc_map import VOCMeanAveragePrecision

CLASSES = 20


def _boxes(n: int, generator: torch.Generator) -> Tensor:
    corner = torch.rand(n, 2, generator=generator) * 400
    size = 20 + torch.rand(n, 2, generator=generator) * 200
    return torch.cat((corner, corner + size), dim=1)


def make_set(images: int, detections: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``(preds, targets)`` in torchmetrics' format; targets also carry ``difficult``."""
    generator = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for _ in range(images):
        objects = int(torch.randint(1, 5, (), generator=generator))
        gt = _boxes(objects, generator)
        labels = torch.randint(1, CLASSES + 1, (objects,), generator=generator)
        targets.append({"boxes": gt, "labels": labels, "difficult": torch.rand(objects, generator=generator) < 0.125})
        # A few detections near the objects, the rest anywhere (as a detector's top 100).
        near = gt.repeat(3, 1) + torch.randn(3 * objects, 4, generator=generator) * 8
        boxes = torch.cat((near, _boxes(detections - len(near), generator)))
        boxes = torch.cat((boxes[:, :2], torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)), dim=1)
        det_labels = torch.cat(
            (labels.repeat(3), torch.randint(1, CLASSES + 1, (detections - len(near),), generator=generator))
        )
        preds.append({"boxes": boxes, "scores": torch.rand(detections, generator=generator), "labels": det_labels})
    return preds, targets


def _timed(metric: torch.nn.Module, preds: list[dict], targets: list[dict]) -> tuple[float, dict]:
    start = time.perf_counter()
    metric.update(preds, targets)
    result = metric.compute()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4952)
    parser.add_argument("--detections", type=int, default=100)
    parser.add_argument("--no-coco", action="store_true", help="VOC numbers only")
    args = parser.parse_args()

    preds, targets = make_set(args.images, args.detections)
    crowd_targets = [{"boxes": t["boxes"], "labels": t["labels"], "iscrowd": t["difficult"].long()} for t in targets]
    ours, result = _timed(VOCMeanAveragePrecision(CLASSES, coco=not args.no_coco), preds, targets)
    theirs, reference = _timed(MeanAveragePrecision(iou_thresholds=[0.5]), preds, crowd_targets)

    print(f"{args.images} images x {args.detections} detections, {CLASSES} classes, one run")
    coco = "off" if args.no_coco else "on"
    print(
        f"VOCMeanAveragePrecision (COCO numbers {coco}): {ours:8.2f} s   "
        f"map {result['map'].item():.4f}" + ("" if args.no_coco else f"  coco_map {result['coco_map'].item():.4f}")
    )
    print(
        f"torchmetrics MeanAveragePrecision(iou_thresholds=[0.5]): {theirs:8.2f} s   map {reference['map'].item():.4f}"
    )
    print(f"ratio (torchmetrics / ours): {theirs / ours:.1f}x")


if __name__ == "__main__":
    main()
