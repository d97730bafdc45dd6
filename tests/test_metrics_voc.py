"""VOCMeanAveragePrecision against a port of the VOC devkit, hand-computed cases and pycocotools
(its COCO numbers come from faster-coco-eval)."""

import copy
import math
import random

import numpy as np
import pytest
import torch
from pycocotools.cocoeval import Params
from reference_voc_eval import voc_eval
from torchmetrics.detection import MeanAveragePrecision

from refvision.data.voc_format import VOC_CLASSES, voc_to_xyxy
from refvision.metrics import VOCMeanAveragePrecision
from refvision.outputs.tables import format_table

SEEDS = range(30)


def random_case(seed: int, tied_scores: bool = True) -> dict:
    """Random VOC-style images: VOC inclusive integer boxes, jittered detections.

    Covers difficult objects, duplicate detections, images without ground truth, images
    without detections, the last class with detections but no ground truth at all, and
    (with three classes or more) the class before it with difficult ground truth only.
    With ``tied_scores`` scores come from a coarse grid and duplicates copy their score, so
    exact ties are frequent; otherwise scores are (almost surely) distinct.
    """
    rng = np.random.default_rng(seed)
    num_classes = int(rng.choice([2, 4, 6, 20]))
    only_difficult = num_classes - 1 if num_classes >= 3 else None
    gt_classes = [c for c in range(1, num_classes) if c != only_difficult]

    def score() -> float:
        value = rng.integers(1, 10) / 10 if tied_scores else rng.random()
        return float(np.float32(value))

    def jitter(box: list[int], width: int, height: int, amount: int) -> list[int]:
        x1, y1, x2, y2 = (v + int(rng.integers(-amount, amount + 1)) for v in box)
        x1, x2 = sorted((min(max(x1, 1), width), min(max(x2, 1), width)))
        y1, y2 = sorted((min(max(y1, 1), height), min(max(y2, 1), height)))
        return [x1, y1, x2, y2]

    images = []
    for _ in range(int(rng.integers(2, 9))):
        width, height = int(rng.integers(60, 200)), int(rng.integers(60, 200))
        kind = rng.choice(["normal", "normal", "no_gt", "no_dets"])
        gts, dets = [], []
        for _ in range(0 if kind == "no_gt" else int(rng.integers(1, 7))):
            x1, y1 = int(rng.integers(1, width - 10)), int(rng.integers(1, height - 10))
            box = [x1, y1, min(x1 + int(rng.integers(3, 60)), width), min(y1 + int(rng.integers(3, 60)), height)]
            if only_difficult is not None and rng.random() < 0.15:
                gts.append({"bbox": box, "name": only_difficult, "difficult": True})
            else:
                label = int(rng.choice(gt_classes))
                gts.append({"bbox": box, "name": label, "difficult": bool(rng.random() < 0.15)})
        if kind != "no_dets":
            for gt in gts:
                for _ in range(int(rng.integers(0, 4))):
                    label = gt["name"] if rng.random() < 0.85 else int(rng.integers(1, num_classes + 1))
                    dets.append([label, score(), jitter(gt["bbox"], width, height, 6)])
                    if rng.random() < 0.2:
                        label, s, box = dets[-1]
                        dets.append([label, s if tied_scores else score(), list(box)])
            for _ in range(int(rng.integers(0, 4))):
                x1, y1 = int(rng.integers(1, width - 5)), int(rng.integers(1, height - 5))
                box = [x1, y1, min(x1 + int(rng.integers(0, 50)), width), min(y1 + int(rng.integers(0, 50)), height)]
                dets.append([int(rng.integers(1, num_classes + 1)), score(), box])
        order = rng.permutation(len(dets))
        images.append({"gts": gts, "dets": [dets[i] for i in order]})
    return {"num_classes": num_classes, "images": images}


def to_metric_inputs(images: list[dict]) -> tuple[list[dict], list[dict]]:
    """The metric's inputs: VOC boxes converted with ``voc_to_xyxy``."""
    preds, targets = [], []
    for image in images:
        dets, gts = image["dets"], image["gts"]
        det_boxes = torch.tensor([d[2] for d in dets], dtype=torch.float64).reshape(-1, 4)
        gt_boxes = torch.tensor([g["bbox"] for g in gts], dtype=torch.float64).reshape(-1, 4)
        preds.append(
            {
                "boxes": voc_to_xyxy(det_boxes),
                "scores": torch.tensor([d[1] for d in dets], dtype=torch.float32),
                "labels": torch.tensor([d[0] for d in dets], dtype=torch.int64),
            }
        )
        targets.append(
            {
                "boxes": voc_to_xyxy(gt_boxes),
                "labels": torch.tensor([g["name"] for g in gts], dtype=torch.int64),
                "difficult": torch.tensor([g["difficult"] for g in gts], dtype=torch.bool),
            }
        )
    return preds, targets


def reference_ap(case: dict, use_07_metric: bool, group_ties: bool = True) -> np.ndarray:
    annotations = {i: image["gts"] for i, image in enumerate(case["images"])}
    return np.array(
        [
            voc_eval(
                [(i, d[1], d[2]) for i, image in enumerate(case["images"]) for d in image["dets"] if d[0] == c],
                annotations,
                c,
                use_07_metric=use_07_metric,
                group_ties=group_ties,
            )
            for c in range(1, case["num_classes"] + 1)
        ]
    )


def evaluate(case: dict, eval_mode: str, **kwargs) -> dict[str, torch.Tensor]:
    metric = VOCMeanAveragePrecision(case["num_classes"], eval_mode=eval_mode, coco=False, **kwargs)
    metric.update(*to_metric_inputs(case["images"]))
    return metric.compute()


def assert_matches_reference(result: dict, expected: np.ndarray) -> None:
    np.testing.assert_allclose(result["ap_per_class"].numpy(), expected, rtol=0, atol=1e-6)
    expected_map = np.nanmean(expected) if not np.isnan(expected).all() else np.nan
    np.testing.assert_allclose(result["map"].item(), expected_map, rtol=0, atol=1e-6)


@pytest.mark.parametrize("eval_mode", ["11points", "area"])
@pytest.mark.parametrize("seed", SEEDS)
def test_matches_devkit_port_with_ties(seed: int, eval_mode: str) -> None:
    case = random_case(seed)
    result = evaluate(case, eval_mode)
    assert_matches_reference(result, reference_ap(case, eval_mode == "11points"))
    assert result[f"map_{eval_mode}"].item() == result["map"].item() or math.isnan(result["map"].item())


@pytest.mark.parametrize("eval_mode", ["11points", "area"])
def test_without_ties_equals_unmodified_devkit(eval_mode: str) -> None:
    for seed in range(100, 110):
        case = random_case(seed, tied_scores=False)
        expected = reference_ap(case, eval_mode == "11points", group_ties=False)
        assert_matches_reference(evaluate(case, eval_mode), expected)


def test_random_cases_cover_the_corner_cases() -> None:
    """The generator really produces what the randomized comparison claims to cover."""
    seen = set()
    for seed in SEEDS:
        case = random_case(seed)
        c = case["num_classes"]
        images = case["images"]
        if np.isnan(reference_ap(case, True)).any():
            seen.add("nan_class")
        gt_labels = {g["name"] for image in images for g in image["gts"]}
        if c >= 3 and c - 1 in gt_labels:
            seen.add("difficult_only_class")
        for image in images:
            scores = [d[1] for d in image["dets"]]
            if len(scores) != len(set(scores)):
                seen.add("tie_in_image")
            if not image["gts"] and image["dets"]:
                seen.add("dets_without_gt")
            if image["gts"] and not image["dets"]:
                seen.add("gt_without_dets")
            if any(g["difficult"] for g in image["gts"]):
                seen.add("difficult")
            if any(d[0] == c for d in image["dets"]):
                seen.add("dets_of_class_without_gt")
            boxes = [(d[0], tuple(d[2])) for d in image["dets"]]
            if len(boxes) != len(set(boxes)):
                seen.add("duplicates")
    assert seen == {
        "nan_class",
        "tie_in_image",
        "dets_without_gt",
        "gt_without_dets",
        "difficult",
        "dets_of_class_without_gt",
        "duplicates",
        "difficult_only_class",
    }


def one_image(dets: list[tuple[list[float], float]], gts: list[list[float]], difficult=None, label: int = 1):
    """Inputs for one image of one class; boxes in 0-based continuous xyxy."""
    pred = {
        "boxes": torch.tensor([d[0] for d in dets], dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor([d[1] for d in dets], dtype=torch.float32),
        "labels": torch.full((len(dets),), label, dtype=torch.int64),
    }
    target = {
        "boxes": torch.tensor(gts, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.full((len(gts),), label, dtype=torch.int64),
    }
    if difficult is not None:
        target["difficult"] = torch.tensor(difficult, dtype=torch.bool)
    return pred, target


def single_class_ap(preds: list[dict], targets: list[dict], eval_mode: str = "11points") -> float:
    metric = VOCMeanAveragePrecision(1, eval_mode=eval_mode, coco=False)
    metric.update(preds, targets)
    # torchmetrics squeezes one-element results: ap_per_class of one class is 0-dim
    return metric.compute()["ap_per_class"].item()


GT = [0.0, 0.0, 10.0, 10.0]
HIT = [1.0, 0.0, 10.0, 10.0]  # IoU 0.9
MISS = [50.0, 50.0, 60.0, 60.0]


@pytest.mark.parametrize(
    ("dets", "num_gts", "ap_11", "ap_area"),
    [
        ([(HIT, 0.9), (MISS, 0.8)], 1, 1.0, 1.0),  # TP then FP: precision 1 at recall 1
        ([(MISS, 0.9), (HIT, 0.8)], 1, 0.5, 0.5),  # FP then TP
        ([(HIT, 0.9), (HIT, 0.8)], 1, 1.0, 1.0),  # duplicate: FP after the TP
        ([(HIT, 0.5), (MISS, 0.5)], 1, 0.5, 0.5),  # tied TP and FP enter together
        ([(MISS, 0.5), (HIT, 0.5)], 1, 0.5, 0.5),
        ([], 1, 0.0, 0.0),
    ],
)
def test_hand_computed_single_gt(dets, num_gts, ap_11, ap_area) -> None:
    pred, target = one_image(dets, [GT] * num_gts)
    assert single_class_ap([pred], [target], "11points") == pytest.approx(ap_11, abs=1e-12)
    assert single_class_ap([pred], [target], "area") == pytest.approx(ap_area, abs=1e-12)


def test_hand_computed_two_gts() -> None:
    """TP, FP, TP on two boxes: recall (.5, .5, 1), precision (1, .5, 2/3)."""
    far = [100.0, 100.0, 110.0, 110.0]
    pred, target = one_image([(HIT, 0.9), (MISS, 0.8), ([101.0, 100.0, 110.0, 110.0], 0.7)], [GT, far])
    # 11-point: t = 0 .. 0.5 reach precision 1, t = 0.6 .. 1 reach 2/3.
    assert single_class_ap([pred], [target], "11points") == pytest.approx((6 + 5 * 2 / 3) / 11, abs=1e-12)
    assert single_class_ap([pred], [target], "area") == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-12)


def test_difficult_detection_is_ignored_and_difficult_only_class_is_nan() -> None:
    difficult_box = [30.0, 30.0, 40.0, 40.0]
    # A detection on the difficult box ranked first would be an FP if it counted.
    pred, target = one_image([([30.0, 30.0, 40.0, 40.0], 0.9), (HIT, 0.8)], [GT, difficult_box], [False, True])
    assert single_class_ap([pred], [target]) == 1.0
    pred, target = one_image([(HIT, 0.8)], [GT], [True])
    assert math.isnan(single_class_ap([pred], [target]))


def test_iou_threshold_is_strict_and_uses_the_plus_one_rule() -> None:
    # VOC boxes (1,1,10,10) and (1,1,10,5): devkit IoU 10*5 / (10*10) = 0.5 exactly: no match.
    half = voc_to_xyxy(torch.tensor([[1.0, 1.0, 10.0, 5.0]]))[0].tolist()
    pred, target = one_image([(half, 0.9)], [GT])
    assert single_class_ap([pred], [target]) == 0.0
    metric = VOCMeanAveragePrecision(1, iou_threshold=0.49, coco=False)
    metric.update([pred], [target])
    assert metric.compute()["map"].item() == 1.0


def test_map_ignores_classes_without_ground_truth() -> None:
    pred, target = one_image([(HIT, 0.9)], [GT])
    stray = {"boxes": torch.tensor([MISS]), "scores": torch.tensor([0.3]), "labels": torch.tensor([3])}
    metric = VOCMeanAveragePrecision(3, coco=False)
    metric.update([pred, stray], [target, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}])
    result = metric.compute()
    assert result["map"].item() == 1.0
    assert torch.isnan(result["ap_per_class"][1:]).all()


def test_update_order_and_batching_do_not_matter() -> None:
    for seed in range(5):
        case = random_case(seed)
        expected = evaluate(case, "11points")["ap_per_class"]
        preds, targets = to_metric_inputs(case["images"])
        order = list(range(len(preds)))
        random.Random(seed).shuffle(order)
        metric = VOCMeanAveragePrecision(case["num_classes"], coco=False)
        for i in order:
            # reverse the detections inside each image too: ties are order-free
            pred = {k: v.flip(0) for k, v in preds[i].items()}
            metric.update([pred], [targets[i]])
        torch.testing.assert_close(metric.compute()["ap_per_class"], expected, equal_nan=True, rtol=0, atol=0)


def split_across_ranks(case: dict, world_size: int) -> list[VOCMeanAveragePrecision]:
    """One metric per rank, images dealt as a DistributedSampler deals them."""
    preds, targets = to_metric_inputs(case["images"])
    metrics = []
    for rank in range(world_size):
        metric = VOCMeanAveragePrecision(case["num_classes"], coco=False)
        mine = range(rank, len(preds), world_size)
        if len(mine):
            metric.update([preds[i] for i in mine], [targets[i] for i in mine])
        metrics.append(metric)
    return metrics


def synced(metrics: list[VOCMeanAveragePrecision]) -> VOCMeanAveragePrecision:
    """Rank 0 after torchmetrics' own ``_sync_dist``, with all_gather simulated.

    Each rank's gathered tensors are recorded (torchmetrics pre-concatenates list states and
    replaces an empty one by a 1-D empty tensor of the metric dtype), then replayed to rank 0
    in rank order, as ``gather_all_tensors`` returns them.
    """
    per_rank = []
    for metric in metrics:
        sent = []
        copy.deepcopy(metric)._sync_dist(dist_sync_fn=lambda t, group=None, sent=sent: sent.append(t) or [t])
        per_rank.append(sent)
    gathered = iter(zip(*per_rank))
    rank0 = copy.deepcopy(metrics[0])
    rank0._sync_dist(dist_sync_fn=lambda t, group=None: list(next(gathered)))
    return rank0


@pytest.mark.parametrize("world_size", [2, 3])
def test_distributed_gather_equals_one_process(world_size: int) -> None:
    for seed in range(8):
        case = random_case(seed)
        case["images"] = case["images"][: world_size + 1]  # some ranks get one image, some two
        expected = evaluate(case, "11points")["ap_per_class"]
        result = synced(split_across_ranks(case, world_size)).compute()["ap_per_class"]
        torch.testing.assert_close(result, expected, equal_nan=True, rtol=0, atol=0)


def test_rank_without_images_gathers() -> None:
    case = random_case(3)
    case["images"] = case["images"][:1]
    expected = evaluate(case, "area")["ap_per_class"]
    metrics = split_across_ranks(case, 2)
    assert not metrics[1].det_counts
    for metric in metrics:
        metric.eval_mode = "area"
    result = synced(metrics).compute()["ap_per_class"]
    torch.testing.assert_close(result, expected, equal_nan=True, rtol=0, atol=0)


def test_merge_state_equals_one_instance() -> None:
    case = random_case(7)
    metrics = split_across_ranks(case, 2)
    metrics[0].merge_state(metrics[1])
    expected = evaluate(case, "11points")["ap_per_class"]
    torch.testing.assert_close(metrics[0].compute()["ap_per_class"], expected, equal_nan=True, rtol=0, atol=0)


def torchmetrics_coco(preds: list[dict], targets: list[dict]) -> dict[str, torch.Tensor]:
    # pycocotools' own float64 thresholds: torchmetrics' defaults are float32 linspaces,
    # which differ on integer boxes whose IoU is exactly 0.55, 0.6, ...
    params = Params(iouType="bbox")
    metric = MeanAveragePrecision(
        iou_type="bbox",
        backend="pycocotools",
        iou_thresholds=params.iouThrs.tolist(),
        rec_thresholds=params.recThrs.tolist(),
    )
    metric.update(
        preds, [{"boxes": t["boxes"], "labels": t["labels"], "iscrowd": t["difficult"].long()} for t in targets]
    )
    return metric.compute()


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 5, 9, 11, 14, 17, 23])
def test_coco_numbers_equal_torchmetrics(seed: int) -> None:
    """faster-coco-eval's numbers equal pycocotools' (through torchmetrics) to 1e-6. Difficult
    boxes given to both as crowd regions; seed 11 has difficult boxes only."""
    case = random_case(seed)
    preds, targets = to_metric_inputs(case["images"])
    metric = VOCMeanAveragePrecision(case["num_classes"])
    metric.update(preds, targets)
    result = metric.compute()
    expected = torchmetrics_coco(preds, targets)
    for ours, theirs in (("coco_map", "map"), ("coco_map_50", "map_50")):
        if expected[theirs].item() == -1.0:  # pycocotools' "nothing to evaluate"
            assert math.isnan(result[ours].item())
        else:
            assert result[ours].item() == pytest.approx(expected[theirs].item(), abs=1e-6)


def test_coco_perfect_predictions_and_no_detections() -> None:
    targets = [
        {"boxes": torch.tensor([[0.0, 0.0, 10.0, 12.0], [20.0, 5.0, 40.0, 30.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[3.0, 3.0, 50.0, 40.0]]), "labels": torch.tensor([2])},
    ]
    preds = [{"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]} for t in targets]
    metric = VOCMeanAveragePrecision(2)
    metric.update(preds, targets)
    result = metric.compute()
    assert result["coco_map"].item() == 1.0 and result["coco_map_50"].item() == 1.0
    assert result["map"].item() == 1.0
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
    metric = VOCMeanAveragePrecision(2)
    metric.update([empty, empty], targets)
    result = metric.compute()
    assert result["coco_map"].item() == 0.0 and result["map"].item() == 0.0


def good_inputs() -> tuple[list[dict], list[dict]]:
    pred, target = one_image([(HIT, 0.9)], [GT], [False])
    return [pred, copy.deepcopy(pred)], [target, copy.deepcopy(target)]


@pytest.mark.parametrize(
    ("arg", "key", "value", "message"),
    [
        ("preds", "scores", None, r"preds\[1\]\['scores'\]: expected a tensor of shape \(1,\)"),
        (
            "preds",
            "boxes",
            torch.zeros(1, 5),
            r"preds\[1\]\['boxes'\]: expected a tensor of shape \(N, 4\), got \(1, 5\)",
        ),
        ("preds", "boxes", torch.tensor([[5.0, 0.0, 1.0, 1.0]]), r"preds\[1\]\['boxes'\]: expected xyxy with x2 >= x1"),
        ("preds", "labels", torch.tensor([0]), r"preds\[1\]\['labels'\]: expected values in 1..1 .*got min 0"),
        ("preds", "labels", torch.tensor([1.0]), r"preds\[1\]\['labels'\]: expected an integer tensor"),
        ("preds", "scores", torch.tensor([float("nan")]), r"preds\[1\]\['scores'\]: expected finite"),
        ("targets", "labels", torch.tensor([2]), r"targets\[1\]\['labels'\]: expected values in 1..1 .*max 2"),
        (
            "targets",
            "difficult",
            torch.tensor([True, False]),
            r"targets\[1\]\['difficult'\]: expected a tensor of shape \(1,\)",
        ),
        ("targets", "difficult", torch.tensor([2]), r"targets\[1\]\['difficult'\]: expected bool or 0/1"),
    ],
)
def test_bad_inputs_name_image_key_and_expectation(arg, key, value, message) -> None:
    preds, targets = good_inputs()
    item = (preds if arg == "preds" else targets)[1]
    if value is None:
        del item[key]
    else:
        item[key] = value
    with pytest.raises(ValueError, match=message):
        VOCMeanAveragePrecision(1).update(preds, targets)


def test_bad_arguments() -> None:
    preds, targets = good_inputs()
    with pytest.raises(ValueError, match="one entry per image"):
        VOCMeanAveragePrecision(1).update(preds, targets[:1])
    with pytest.raises(ValueError, match="eval_mode"):
        VOCMeanAveragePrecision(eval_mode="coco")
    with pytest.raises(ValueError, match="class_names: expected 3 names"):
        VOCMeanAveragePrecision(3, class_names=["a"])


def test_format_table_lists_every_class_and_the_mean() -> None:
    metric = VOCMeanAveragePrecision(class_names=VOC_CLASSES, coco=False)
    pred, target = one_image([(HIT, 0.9), (MISS, 0.8)], [GT], label=15)
    metric.update([pred], [target])
    table = format_table(metric.compute(), metric.class_names)
    lines = table.splitlines()
    assert len(lines) == 2 + 20 + 2
    assert lines[16].split() == ["person", "100.00"]
    assert lines[2].split() == ["aeroplane", "-"]
    assert lines[-1].split() == ["mAP", "100.00"]
    assert len({len(line) for line in lines}) == 1


def test_twenty_classes_are_not_taken_for_voc_unless_named() -> None:
    metric = VOCMeanAveragePrecision(coco=False)
    pred, target = one_image([(HIT, 0.9)], [GT], label=15)
    metric.update([pred], [target])
    assert metric.class_names is None
    assert format_table(metric.compute(), metric.class_names).splitlines()[16].split() == ["class", "14", "100.00"]
