"""What `refvision test` leaves in the log folder: per-class CSV tables, PNG figures, TensorBoard and CSV logs.

Every saved number is checked against an independent count made here from the model's own
predictions (devkit port, pixel counting, label counting) and against the logged metrics.
"""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_miou import reference_scores
from reference_voc_eval import voc_curve, voc_eval
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_metrics_voc import random_case, to_metric_inputs
from torchvision.io import decode_png, read_file

from refvision.app.cli import lightning_cli
from refvision.app.demo.data import write_cityscapes, write_imagefolder, write_vocdevkit
from refvision.data.voc_format import xyxy_to_voc
from refvision.metrics import VOCMeanAveragePrecision
from refvision.outputs.figures import per_class_bars, save_figure
from refvision.outputs.tables import PerClassTable, confusion_table, format_table, render_table

COMMON = ["--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu", "--seed_everything", "0"]


def _read_csv(path: Path) -> tuple[list[str], dict[str, list[float]]]:
    """Header and ``{row name: values}`` of a saved table."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], {row[0]: [float(v) for v in row[1:]] for row in rows[1:]}


def _logged(log_dir: Path) -> dict[str, float]:
    """Last value of each metric in ``metrics.csv``."""
    values: dict[str, float] = {}
    with (log_dir / "metrics.csv").open() as f:
        for row in csv.DictReader(f):
            values.update({k: float(v) for k, v in row.items() if v != ""})
    return values


def _board(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events


def _assert_png(path: Path) -> None:
    image = decode_png(read_file(str(path)))
    assert image.shape[0] in (3, 4) and min(image.shape[1:]) >= 100, (path, image.shape)


def _assert_outputs(log_dir: Path, figures: list[str], logged: dict[str, float]) -> None:
    """The PNGs exist and decode; TensorBoard holds the same figures and the logged test scalars."""
    for stem in figures:
        _assert_png(log_dir / f"{stem}.png")
    board = _board(log_dir)
    assert sorted(board.Tags()["images"]) == sorted(stem.replace("test_", "test/") for stem in figures)
    for key, value in logged.items():
        if key.startswith("test/"):
            assert board.Scalars(key)[-1].value == pytest.approx(value, rel=1e-6)


def _close(saved: list[float], expected: np.ndarray, atol: float = 1e-12) -> None:
    np.testing.assert_allclose(np.array(saved, dtype=np.float64), expected, rtol=0, atol=atol)


def test_render_table_plain_and_terminal() -> None:
    plain = render_table(["class", "AP"], [["cat", "1.00"], ["dog", "-"]], [["mAP", "1.00"]], terminal=False)
    assert plain.splitlines() == [
        "class     AP",
        "------------",
        "cat     1.00",
        "dog        -",
        "------------",
        "mAP     1.00",
    ]
    styled = render_table(["class", "AP"], [["cat", "1.00"]], terminal=True)
    assert "\x1b[" in styled and "─" in styled
    with pytest.raises(ValueError, match=r"table row \['cat'\]: expected 2 cells"):
        render_table(["class", "AP"], [["cat"]], terminal=False)


def test_per_class_csv_round_trips_at_full_precision(tmp_path: Path) -> None:
    ap = torch.tensor([1 / 3, float("nan"), 0.1], dtype=torch.float64)
    table = PerClassTable(("a", "b", "c"), {"AP": ap}, {"AP": float(ap.nanmean())}, "mAP")
    header, rows = _read_csv(table.save_csv(tmp_path / "t.csv"))
    assert header == ["class", "AP"]
    assert rows["a"] == [1 / 3] and math.isnan(rows["b"][0]) and rows["c"] == [0.1]
    assert format_table({"ap_per_class": ap, "map": ap.nanmean()}, ["a", "b", "c"]).splitlines()[-1].split() == [
        "mAP",
        "21.67",
    ]
    counts = torch.tensor([[3, 1], [0, 2]])
    header, rows = _read_csv(confusion_table(counts, ["x", "y"]).save_csv(tmp_path / "c.csv"))
    assert header == ["true \\ predicted", "x", "y"] and rows == {"x": [3.0, 1.0], "y": [0.0, 2.0]}
    with pytest.raises(ValueError, match="column 'AP': expected 3 values"):
        PerClassTable(("a", "b", "c"), {"AP": ap[:2]}, {})


def test_save_figure_writes_a_png(tmp_path: Path) -> None:
    path = save_figure(per_class_bars(["a", "b"], torch.tensor([0.5, float("nan")]), "AP", "AP"), tmp_path / "f.png")
    _assert_png(path)


@pytest.mark.parametrize("seed", range(8))
def test_pr_curves_are_the_devkit_curves(seed: int) -> None:
    case = random_case(seed, tied_scores=seed % 2 == 0)
    metric = VOCMeanAveragePrecision(case["num_classes"], eval_mode="area", coco=False)
    metric.update(*to_metric_inputs(case["images"]))
    curves = metric.compute()["pr_curves"]
    annotations = {i: image["gts"] for i, image in enumerate(case["images"])}
    assert len(curves) == case["num_classes"]
    for c, curve in enumerate(curves, start=1):
        dets = [(i, d[1], d[2]) for i, image in enumerate(case["images"]) for d in image["dets"] if d[0] == c]
        expected = voc_curve(dets, annotations, c)
        if expected is None:
            assert curve.shape == (2, 0)
        else:
            np.testing.assert_allclose(curve.reshape(2, -1).numpy(), np.stack(expected).reshape(2, -1), atol=1e-12)


@pytest.mark.slow
def test_classification_outputs_hold_the_run_numbers(tmp_path: Path) -> None:
    data = write_imagefolder(tmp_path / "images", train_per_class=1, val_per_class=3, size=32)
    cli = lightning_cli(
        [
            "test",
            "-c",
            "configs/demo/classification.yaml",
            *COMMON,
            "--data.root",
            str(data),
            "--data.image_size",
            "32",
            "--data.resize_size",
            "32",
            "--data.batch_size",
            "4",
            "--model.backbone",
            "mobilenet_v2",
            "--model.image_size",
            "32",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
        ]
    )
    log_dir = Path(cli.trainer.log_dir)
    assert log_dir == tmp_path / "run" / "lightning_logs" / "version_0"
    # Independent: the model's arg-max over the test images, counted by label.
    names = cli.datamodule.class_names
    confusion = np.zeros((len(names), len(names)), dtype=np.int64)
    model = cli.model.eval()
    with torch.no_grad():
        for images, labels in cli.datamodule.test_dataloader():
            for label, pred in zip(labels.tolist(), model(images).argmax(1).tolist()):
                confusion[label, pred] += 1
    header, rows = _read_csv(log_dir / "test_per_class.csv")
    assert header == ["class", "top-1"] and list(rows) == names
    accuracy = confusion.diagonal() / confusion.sum(1)
    _close([rows[n][0] for n in names], accuracy, atol=1e-7)  # torchmetrics divides in float32
    _, counts = _read_csv(log_dir / "test_confusion_matrix.csv")
    assert np.array([counts[n] for n in names]).tolist() == confusion.tolist()
    logged = _logged(log_dir)
    assert logged["test/top1"] == pytest.approx(accuracy.mean(), abs=1e-6)
    _assert_outputs(log_dir, ["test_confusion_matrix"], logged)


@pytest.mark.slow
def test_segmentation_outputs_hold_the_run_numbers(tmp_path: Path) -> None:
    data = write_cityscapes(tmp_path / "cityscapes", num_train=1, num_val=3, size=(64, 128))
    cli = lightning_cli(
        [
            "test",
            "-c",
            "configs/demo/segmentation.yaml",
            *COMMON,
            "--data.root",
            str(data),
            "--data.val_batch_size",
            "2",
            "--data.pin_memory",
            "false",
            "--model.example_size",
            "[64,128]",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
        ]
    )
    log_dir = Path(cli.trainer.log_dir)
    task = cli.model.eval()
    preds, masks = [], []
    with torch.no_grad():
        for images, target in cli.datamodule.test_dataloader():
            preds.append(task(images).argmax(1))
            masks.append(target)
    reference = reference_scores(torch.cat(preds).numpy(), torch.cat(masks).numpy(), 19, 255)
    header, rows = _read_csv(log_dir / "test_per_class.csv")
    names = cli.datamodule.class_names
    assert header == ["class", "IoU", "accuracy"] and list(rows) == names
    _close([rows[n][0] for n in names], reference["iou_per_class"])
    logged = _logged(log_dir)
    assert logged["test/miou"] == pytest.approx(np.nanmean([rows[n][0] for n in names]), abs=1e-6)
    assert logged["test/mean_accuracy"] == pytest.approx(np.nanmean([rows[n][1] for n in names]), abs=1e-6)
    _, counts = _read_csv(log_dir / "test_confusion_matrix.csv")
    expected = np.zeros((19, 19), dtype=np.int64)
    target, pred = torch.cat(masks).numpy(), torch.cat(preds).numpy()
    kept = target != 255
    np.add.at(expected, (target[kept], pred[kept]), 1)
    assert np.array([counts[n] for n in names]).tolist() == expected.tolist()
    _assert_outputs(log_dir, ["test_iou_per_class", "test_confusion_matrix", "test_samples"], logged)
    # Three test images, three rows of image / ground truth / prediction.
    grid = decode_png(read_file(str(log_dir / "test_samples.png")))
    assert grid.shape[1] > grid.shape[2] * 0.5


@pytest.mark.slow
def test_detection_outputs_hold_the_run_numbers(tmp_path: Path) -> None:
    data = write_vocdevkit(tmp_path / "VOCdevkit", num_train=2, num_test=4, size=(48, 64))
    cli = lightning_cli(
        [
            "test",
            "-c",
            "configs/demo/detection.yaml",
            *COMMON,
            "--data.root",
            str(data),
            "--data.pin_memory",
            "false",
            "--data.image_size",
            "64",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
        ]
    )
    log_dir = Path(cli.trainer.log_dir)
    task = cli.model.eval()
    detections: dict[int, list] = {}
    annotations: dict[int, list[dict]] = {}
    with torch.no_grad():
        for images, targets in cli.datamodule.test_dataloader():
            for found, target in zip(task(images), targets):
                i = len(annotations)
                voc = xyxy_to_voc(target["boxes"].double()).tolist()
                annotations[i] = [
                    {"name": int(label), "bbox": box, "difficult": bool(hard)}
                    for label, box, hard in zip(target["labels"], voc, target["difficult"])
                ]
                boxes = xyxy_to_voc(found["boxes"].double()).tolist()
                for label, score, box in zip(found["labels"].tolist(), found["scores"].tolist(), boxes):
                    detections.setdefault(label, []).append((i, score, box))
    names = cli.datamodule.class_names[1:]
    expected = np.array([voc_eval(detections.get(c, []), annotations, c) for c in range(1, len(names) + 1)])
    header, rows = _read_csv(log_dir / "test_per_class.csv")
    assert header == ["class", "AP"] and list(rows) == names
    np.testing.assert_allclose([rows[n][0] for n in names], expected, rtol=0, atol=1e-6)
    logged = _logged(log_dir)
    if not np.isnan(expected).all():
        assert logged["test/map"] == pytest.approx(np.nanmean(expected), abs=1e-6)
    _assert_outputs(log_dir, ["test_ap_per_class", "test_pr_curves"], logged)
