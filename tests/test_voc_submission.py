"""VOC devkit result files and COCO results JSON from `refvision predict`, scored back independently.

The devkit files are parsed as ``voc_eval.py`` does and scored with the devkit port
(``reference_voc_eval``); the COCO results JSON is scored with pycocotools against ground
truth built here from the XML files. Both must give `refvision test`'s numbers on the same
checkpoint and data.
"""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from reference_voc_eval import voc_eval

from refvision.app.cli import lightning_cli, main
from refvision.app.demo.data import write_vocdevkit
from refvision.data.voc_format import VOC_CLASSES
from refvision.tasks.detection import DetectionTask

CONFIG = "configs/demo/detection.yaml"


def _args(root: Path, data: Path, *extra: str) -> list[str]:
    return [
        "-c",
        CONFIG,
        *extra,
        "--data.root",
        str(data),
        "--data.pin_memory",
        "false",
        "--data.image_size",
        "64",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "1",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
    ]


def _annotations(data: Path, ids: list[str]) -> dict[str, list[dict]]:
    """image id -> objects ``{"name", "bbox" (VOC 1-based inclusive), "difficult"}``, read as the devkit does."""
    out = {}
    for image_id in ids:
        root = ET.parse(data / "VOC2007" / "Annotations" / f"{image_id}.xml").getroot()
        out[image_id] = [
            {
                "name": obj.findtext("name"),
                "difficult": int(obj.findtext("difficult") or 0),
                "bbox": [int(float(obj.find("bndbox").findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax")],
            }
            for obj in root.findall("object")
        ]
    return out


@pytest.mark.slow
def test_devkit_files_and_coco_json_score_as_refvision_test(tmp_path: Path) -> None:
    data = write_vocdevkit(tmp_path / "VOCdevkit", num_train=16, num_test=12, size=(48, 64))
    fit = lightning_cli(["fit", *_args(tmp_path / "fit", data)])
    # A few steps from scratch leave no detection above SSD's score floor, and an untrained head
    # scores every class alike (ties keep the first labels only): keep the fit's checkpoint as
    # the container, with freshly initialised weights whose class scores are spread at random.
    checkpoint = torch.load(fit.trainer.checkpoint_callback.best_model_path, weights_only=True)
    torch.manual_seed(0)
    task = DetectionTask(image_size=64, norm_momentum=0.2)
    with torch.no_grad():
        for param in task.model.head.classification_head.parameters():
            param.normal_(0.0, 0.3)
    checkpoint["state_dict"] = task.state_dict()
    ckpt = str(tmp_path / "model.ckpt")
    torch.save(checkpoint, ckpt)
    tested = lightning_cli(["test", *_args(tmp_path / "test", data), "--ckpt_path", ckpt]).trainer.callback_metrics
    out = tmp_path / "predictions"
    main(
        [
            "predict",
            *_args(tmp_path / "predict", data),
            "--ckpt_path",
            ckpt,
            "--return_predictions",
            "false",
            "--trainer.callbacks+=refvision.outputs.writers.DetectionPredictionWriter",
            "--trainer.callbacks.output_dir",
            str(out),
            "--trainer.callbacks.voc_set",
            "2007-test",
        ]
    )

    ids = (data / "VOC2007" / "ImageSets" / "Main" / "test.txt").read_text().split()
    annotations = _annotations(data, ids)
    main_dir = out / "results" / "VOC2007" / "Main"
    assert sorted(p.name for p in main_dir.iterdir()) == sorted(f"comp4_det_test_{c}.txt" for c in VOC_CLASSES)
    aps = []
    for name in VOC_CLASSES:
        lines = [line.split() for line in (main_dir / f"comp4_det_test_{name}.txt").read_text().splitlines()]
        detections = [(x[0], float(x[1]), [float(v) for v in x[2:]]) for x in lines]
        assert {d[0] for d in detections} <= set(ids)
        assert all(1 <= box[0] <= box[2] and 1 <= box[1] <= box[3] for _, _, box in detections)
        aps.append(voc_eval(detections, annotations, name, use_07_metric=True))
    devkit_map = float(np.nanmean(aps))
    assert devkit_map > 0  # a real number to agree on, not the zero of an empty file
    assert devkit_map == pytest.approx(float(tested["test/map"]), abs=1e-6)

    gt = COCO()
    gt.dataset = {
        "images": [{"id": i} for i in ids],
        "categories": [{"id": k + 1, "name": c} for k, c in enumerate(VOC_CLASSES)],
        "annotations": [
            {
                "id": n + 1,
                "image_id": image_id,
                "category_id": VOC_CLASSES.index(obj["name"]) + 1,
                "bbox": [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1],
                "area": (x2 - x1 + 1) * (y2 - y1 + 1),
                "iscrowd": obj["difficult"],
            }
            for n, (image_id, obj) in enumerate((i, o) for i in ids for o in annotations[i])
            for x1, y1, x2, y2 in [obj["bbox"]]
        ],
    }
    gt.createIndex()
    results = json.loads((out / "coco_results.json").read_text())
    assert len(results) == sum(len(lines) for lines in (p.read_text().splitlines() for p in main_dir.iterdir()))
    evaluator = COCOeval(gt, gt.loadRes(results), iouType="bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(float(tested["test/coco_map"]), abs=1e-6)
