"""Detection results in the formats evaluation servers read: VOC devkit files and COCO results JSON.

Boxes come in refvision's convention (0-based continuous ``xyxy``, see
``refvision.data.voc_format``); numbers are written at full precision (the shortest text that
reads back to the same float) so that scoring the files gives what ``refvision test`` gives.
"""

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from refvision.data.voc_format import xyxy_to_voc

_VOC_SET = re.compile(r"(\d{4})-(\w+)")


def voc_result_file(results_root: Path, voc_set: str, class_name: str) -> Path:
    """``results_root/VOC<year>/Main/comp4_det_<split>_<class>.txt`` for ``voc_set`` ``"YEAR-SPLIT"``.

    That is the devkit's results layout: ``tar -czf results.tgz results`` is what the VOC
    server takes for ``results_root = .../results``.
    """
    match = _VOC_SET.fullmatch(voc_set)
    if match is None:
        raise ValueError(f"voc_set={voc_set!r} is not of the form 'YEAR-SPLIT', e.g. '2007-test'")
    year, split = match.groups()
    return results_root / f"VOC{year}" / "Main" / f"comp4_det_{split}_{class_name}.txt"


def voc_lines(image_id: str, boxes: Tensor, scores: Tensor, labels: Tensor, label: int) -> list[str]:
    """Devkit lines ``<image_id> <score> <xmin> <ymin> <xmax> <ymax>`` of one image's detections of ``label``.

    ``boxes (D, 4)`` 0-based continuous ``xyxy`` become the devkit's 1-based inclusive pixel
    coordinates (``xmin + 1, ymin + 1, xmax, ymax``), computed in float64.
    """
    keep = labels == label
    voc = xyxy_to_voc(boxes[keep].double()).tolist()
    return [
        f"{image_id} {score!r} " + " ".join(repr(v) for v in box)
        for score, box in zip(scores[keep].double().tolist(), voc)
    ]


def coco_results(
    image_id: str, boxes: Tensor, scores: Tensor, labels: Tensor, category_ids: Sequence[int] | None = None
) -> list[dict]:
    """COCO results records ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` of one image.

    ``bbox`` is COCO's 0-based continuous ``xywh`` (no ``+1``); ``category_id`` is the data's id of
    the label, ``category_ids[label - 1]``, where given (COCO data), else the model's label (1..20
    for VOC, in ``VOC_CLASSES`` order).
    """
    boxes = boxes.double()
    xywh = torch.cat((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), dim=1).tolist()
    ids = labels.tolist() if category_ids is None else [category_ids[label - 1] for label in labels.tolist()]
    return [
        {"image_id": image_id, "category_id": category_id, "bbox": box, "score": score}
        for category_id, box, score in zip(ids, xywh, scores.double().tolist())
    ]


def write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1))
