"""COCOMeanAveragePrecision against pycocotools' COCOeval run on the annotation file and a results JSON.

The ground truth reaches the metric as refvision's reader gives it (``CocoDetection``'s evaluation
targets); the reference reads the file itself with pycocotools, and the detections as a results
file, in the file's category and image ids.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from test_data_coco import SIZE, write_coco

from refvision.data import CocoDetection, detection_collate
from refvision.metrics import COCO_STATS, COCOMeanAveragePrecision

CATEGORY_IDS = (1, 3, 7)


@pytest.fixture(scope="module")
def coco_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_coco(tmp_path_factory.mktemp("coco"), num_images=10, seed=1)


def _detections(dataset: CocoDetection, seed: int) -> list[dict[str, torch.Tensor]]:
    """Per sample: jittered copies of its boxes (crowd regions too; some of another category, some
    repeated), random boxes, tied and untied scores; float32 ``xyxy`` as a detector gives them."""
    rng = np.random.default_rng(seed)
    detections = []
    for image in dataset.images:
        boxes, scores, labels = [], [], []
        for (x, y, w, h), label in zip(image.bbox.tolist(), image.labels.tolist()):
            for _ in range(int(rng.integers(0, 4))):
                dx, dy, dw, dh = rng.normal(0, 0.15, 4) * [w, h, w, h]
                x1, y1 = max(0.0, x + dx), max(0.0, y + dy)
                boxes.append([x1, y1, max(x1 + 1, x + w + dw), max(y1 + 1, y + h + dh)])
                labels.append(label if rng.random() < 0.8 else int(rng.integers(1, 4)))
                scores.append(float(rng.integers(1, 10)) / 10 if rng.random() < 0.3 else float(rng.random()))
        for _ in range(int(rng.integers(0, 3))):
            x1, y1 = rng.uniform(0, SIZE - 8, 2)
            boxes.append([x1, y1, x1 + rng.uniform(4, 30), y1 + rng.uniform(4, 30)])
            labels.append(int(rng.integers(1, 4)))
            scores.append(float(rng.random()))
        detections.append(
            {
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "scores": torch.tensor(scores, dtype=torch.float32),
                "labels": torch.tensor(labels, dtype=torch.int64),
            }
        )
    return detections


def _results_file(path: Path, dataset: CocoDetection, detections: list[dict[str, torch.Tensor]]) -> Path:
    """The detections as a COCO results JSON in the file's image and category ids."""
    records = []
    for image, det in zip(dataset.images, detections):
        for (x1, y1, x2, y2), score, label in zip(
            det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()
        ):
            records.append(
                {
                    "image_id": image.image_id,
                    "category_id": CATEGORY_IDS[label - 1],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": score,
                }
            )
    path.write_text(json.dumps(records))
    return path


def _cocoeval(annotation_file: Path, results_file: Path, category: int | None = None) -> np.ndarray:
    ground_truth = COCO(str(annotation_file))
    evaluator = COCOeval(ground_truth, ground_truth.loadRes(str(results_file)), "bbox")
    if category is not None:
        evaluator.params.catIds = [category]
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats


def _same(value: torch.Tensor, reference: float) -> bool:
    """Equal as floats; pycocotools' -1 (nothing to average) is NaN here."""
    return math.isnan(value.item()) if reference == -1 else value.item() == reference


@pytest.mark.parametrize("seed", range(4))
def test_the_metric_gives_cocoeval_numbers_of_the_file(
    coco_data: tuple[Path, Path], tmp_path: Path, seed: int, device: str
) -> None:
    annotation_file, images_dir = coco_data
    dataset = CocoDetection(annotation_file, images_dir)
    detections = _detections(dataset, seed)
    expected = _cocoeval(annotation_file, _results_file(tmp_path / "results.json", dataset, detections))
    assert expected[0] > 0 and expected[0] < 1

    # Images arrive in another order, over several batches, one of them twice (a distributed
    # sampler's padding).
    order = np.random.default_rng(seed).permutation(len(dataset)).tolist()
    order.append(order[0])
    metric = COCOMeanAveragePrecision(CATEGORY_IDS).to(device)
    on_device = [{key: value.to(device) for key, value in det.items()} for det in detections]
    for start in range(0, len(order), 3):
        part = order[start : start + 3]
        _, targets = detection_collate([dataset[i] for i in part])
        targets = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
        metric.update([on_device[i] for i in part], targets)
    result = metric.compute()
    for name, reference in zip(COCO_STATS, expected):
        assert _same(result[name], float(reference)), (name, result[name].item(), reference)

    for label, category in enumerate(CATEGORY_IDS, start=1):
        alone = _cocoeval(annotation_file, tmp_path / "results.json", category)
        assert _same(result["ap_per_class"][label - 1], float(alone[0]))
        assert _same(result["ap50_per_class"][label - 1], float(alone[1]))


def _target(image_id: int, bbox: list[list[float]], labels: list[int], iscrowd: list[bool]) -> dict:
    return {
        "image_id": image_id,
        "bbox": torch.tensor(bbox, dtype=torch.float64).reshape(-1, 4),
        "labels": torch.tensor(labels),
        "iscrowd": torch.tensor(iscrowd),
        "area": torch.tensor([w * h for _, _, w, h in bbox], dtype=torch.float64),
        "annotation_id": torch.arange(1, len(bbox) + 1) + 10 * image_id,
    }


def test_detections_on_a_crowd_region_are_neither_true_nor_false() -> None:
    # A person and a crowd of them: the detection of the person is right at every IoU threshold;
    # three detections inside the crowd region count for nothing. Were the crowd a regular box, two
    # of them would be false positives (AP 0.5 * (1 + 2/3) at most) and it would halve the recall.
    target = _target(4, [[0, 0, 10, 20], [30, 0, 30, 40]], [1, 1], [False, True])
    pred = {
        "boxes": torch.tensor([[0.0, 0, 10, 20], [31, 1, 40, 20], [40, 10, 50, 30], [32, 22, 58, 39]]),
        "scores": torch.tensor([0.5, 0.9, 0.8, 0.7]),
        "labels": torch.tensor([1, 1, 1, 1]),
    }
    metric = COCOMeanAveragePrecision([5])
    metric.update([pred], [target])
    result = metric.compute()
    assert result["map"].item() == pytest.approx(1.0, abs=1e-12)
    assert result["mar_100"].item() == pytest.approx(1.0, abs=1e-12)


def test_labels_are_reported_in_the_categorys_id() -> None:
    # Label 2 is category 9: a detection of label 2 on category 9's box is right; of label 1, wrong.
    target = _target(1, [[0, 0, 10, 10]], [2], [False])
    box = torch.tensor([[0.0, 0, 10, 10]])
    metric = COCOMeanAveragePrecision([4, 9])
    metric.update([{"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([2])}], [target])
    assert metric.compute()["ap_per_class"].tolist()[1] == pytest.approx(1.0, abs=1e-12)
    metric.reset()
    metric.update([{"boxes": box, "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}], [target])
    result = metric.compute()
    assert result["map"].item() == 0.0 and math.isnan(result["ap_per_class"][0].item())


def test_without_detections_every_ap_is_zero() -> None:
    metric = COCOMeanAveragePrecision([1, 2])
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    metric.update([empty], [_target(3, [[5, 5, 20, 20]], [1], [False])])
    result = metric.compute()
    assert result["map"].item() == 0.0 and result["mar_100"].item() == 0.0
    assert result["ap_per_class"][0].item() == 0.0 and math.isnan(result["ap_per_class"][1].item())
    assert result["pr_curves"][0].shape == (2, 101) and result["pr_curves"][1].shape == (2, 0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": torch.tensor([3])}, r"^targets\[0\]\['labels'\]: expected values in 1\.\.2 \(0 is background\)"),
        ({"image_id": "a"}, r"^targets\[0\]\['image_id'\]: expected the image's integer id, got 'a'"),
        ({"area": torch.zeros(2)}, r"^targets\[0\]\['area'\]: expected a tensor of shape \(1,\), one per box"),
    ],
)
def test_bad_inputs_are_one_line_errors_naming_the_key(change: dict, message: str) -> None:
    metric = COCOMeanAveragePrecision([1, 2])
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    with pytest.raises(ValueError, match=message):
        metric.update([empty], [{**_target(3, [[5, 5, 20, 20]], [1], [False]), **change}])
