"""The segmentation writer's Cityscapes mode gives a folder the official evaluator accepts as is.

The evaluator (cityscapesScripts ``evalPixelLevelSemanticLabeling``) walks ``CITYSCAPES_RESULTS``
and, for each ground-truth file ``<city>_<seq>_<frame>_gtFine_labelIds.png``, requires exactly
one file matching ``*<city>_<seq>_<frame>*.png``; it reads label ids (not train ids) and scores
its 19 evaluation labels. Both rules are implemented here from the official label table,
written out below independently of refvision's copy.
"""

import fnmatch
import os
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from refvision.app.cli import lightning_cli, main
from refvision.app.demo.data import write_cityscapes
from refvision.data import presets
from refvision.tasks.segmentation import SegmentationTask

OFFICIAL_TRAINID_TO_ID = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
"""cityscapesScripts ``helpers/labels.py``: label id of train ids 0..18 (road ... bicycle); these are
also exactly the labels with ``ignoreInEval=False``, the ones the evaluator scores."""


def _args(root: Path, data: Path, *extra: str) -> list[str]:
    return [
        "-c",
        "configs/demo/segmentation.yaml",
        *extra,
        "--data.root",
        str(data),
        "--data.test_split",
        "val",
        "--data.crop_size",
        "[64,128]",
        "--model.example_size",
        "[64,128]",
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


def _prediction_for(results: Path, gt_file: Path) -> Path:
    """The evaluator's ``getPrediction``: exactly one ``*<city>_<seq>_<frame>*.png`` anywhere under ``results``."""
    city, seq, frame = gt_file.name.split("_")[:3]
    pattern = f"*{city}_{seq}_{frame}*.png"
    matches = [Path(root, f) for root, _, files in os.walk(results) for f in fnmatch.filter(files, pattern)]
    assert len(matches) == 1, f"{gt_file.name}: {len(matches)} predictions match {pattern} in {results}"
    return matches[0]


def _evaluator_miou(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean IoU over the 19 evaluation label ids, as the evaluator computes it (NaN classes left out)."""
    ious = []
    for label in OFFICIAL_TRAINID_TO_ID:
        tp = sum(int(((p == label) & (g == label)).sum()) for p, g in pairs)
        fp = sum(int(((p == label) & (g != label) & np.isin(g, OFFICIAL_TRAINID_TO_ID)).sum()) for p, g in pairs)
        fn = sum(int(((g == label) & (p != label)).sum()) for p, g in pairs)
        if tp + fp + fn > 0:
            ious.append(tp / (tp + fp + fn))
    return float(np.mean(ious))


@pytest.mark.slow
def test_val_and_test_folders_are_what_the_evaluator_accepts(tmp_path: Path) -> None:
    data = write_cityscapes(tmp_path / "cityscapes", num_train=4, num_val=3, size=(64, 128))
    ckpt = lightning_cli(["fit", *_args(tmp_path / "fit", data)]).trainer.checkpoint_callback.best_model_path
    tested = lightning_cli(["test", *_args(tmp_path / "test", data), "--ckpt_path", ckpt]).trainer.callback_metrics
    out = tmp_path / "val_predictions"
    main(
        [
            "predict",
            *_args(tmp_path / "predict", data),
            "--ckpt_path",
            ckpt,
            "--return_predictions",
            "false",
            "--trainer.callbacks+=refvision.outputs.writers.SegmentationPredictionWriter",
            "--trainer.callbacks.output_dir",
            str(out),
            "--trainer.callbacks.cityscapes",
            "true",
        ]
    )

    results = out / "labels"  # CITYSCAPES_RESULTS
    gt_files = sorted((data / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    assert len(gt_files) == 3
    assert len([p for p in results.rglob("*") if p.is_file()]) == len(gt_files)
    pairs = []
    for gt_file in gt_files:
        prediction = np.asarray(Image.open(_prediction_for(results, gt_file)))
        gt = np.asarray(Image.open(gt_file))
        assert prediction.shape == gt.shape and prediction.dtype == np.uint8
        assert set(np.unique(prediction).tolist()) <= set(OFFICIAL_TRAINID_TO_ID)  # label ids, never train ids
        pairs.append((prediction, gt))
        for folder in ("color", "overlay"):  # kept out of the results folder, same name
            assert (out / folder / _prediction_for(results, gt_file).relative_to(results)).is_file()
    assert _evaluator_miou(pairs) == pytest.approx(float(tested["test/miou"]), abs=1e-6)

    # The test split: images only (its labels are not public), through the plain-folder data module.
    shutil.rmtree(data / "leftImg8bit" / "test")
    shutil.copytree(data / "leftImg8bit" / "val", data / "leftImg8bit" / "test")
    test_out = tmp_path / "test_predictions"
    main(
        [
            "predict",
            "-c",
            "configs/demo/segmentation.yaml",
            "-c",
            "configs/predict/segmentation.yaml",
            "--data.root",
            str(data / "leftImg8bit" / "test"),
            "--ckpt_path",
            ckpt,
            "--trainer.default_root_dir",
            str(tmp_path / "predict_test"),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.callbacks.output_dir",
            str(test_out),
            "--trainer.callbacks.cityscapes",
            "true",
        ]
    )
    for gt_file, (prediction, _) in zip(gt_files, pairs):
        assert np.array_equal(np.asarray(Image.open(_prediction_for(test_out / "labels", gt_file))), prediction)


def test_cityscapes_mode_refuses_names_the_evaluator_cannot_match(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32)).save(images / "holiday.jpg")
    with pytest.raises(SystemExit, match=r"<city>_<seq>_<frame>.*holiday\.jpg"):
        main(
            [
                "predict",
                "-c",
                "configs/demo/segmentation.yaml",
                "-c",
                "configs/predict/segmentation.yaml",
                "--data.root",
                str(images),
                "--trainer.default_root_dir",
                str(tmp_path / "run"),
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.callbacks.output_dir",
                str(tmp_path / "out"),
                "--trainer.callbacks.cityscapes",
                "true",
            ]
        )
    assert not (tmp_path / "out").exists()


def test_train_id_to_label_id_table_is_the_official_one() -> None:
    from refvision.data.cityscapes_labels import TRAINID_TO_ID

    assert TRAINID_TO_ID.tolist() == OFFICIAL_TRAINID_TO_ID


def _predict_cityscapes(tmp_path: Path, task: SegmentationTask) -> Path:
    """Predict with ``task`` (as a checkpoint) on two Cityscapes-named images in Cityscapes mode."""
    images = tmp_path / "leftImg8bit"
    images.mkdir()
    rng = np.random.default_rng(0)
    for frame in ("000000", "000001"):
        pixels = rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"aachen_{frame}_000019_leftImg8bit.png")
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(task)
    trainer.save_checkpoint(tmp_path / "seg.ckpt")
    checkpoint = torch.load(tmp_path / "seg.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["_class_path"] = "refvision.tasks.segmentation.SegmentationTask"
    torch.save(checkpoint, tmp_path / "seg.ckpt")
    out = tmp_path / "out"
    main(
        [
            "predict",
            "-c",
            "configs/demo/segmentation.yaml",
            "-c",
            "configs/predict/segmentation.yaml",
            "--data.root",
            str(images),
            "--ckpt_path",
            str(tmp_path / "seg.ckpt"),
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.callbacks.output_dir",
            str(out),
            "--trainer.callbacks.cityscapes",
            "true",
        ]
    )
    return out


def test_label_ids_are_those_of_the_class_names_the_model_has(tmp_path: Path) -> None:
    torch.manual_seed(0)
    task = SegmentationTask(num_classes=3, output_stride=16, example_size=(32, 48), class_names=["sky", "car", "road"])
    out = _predict_cityscapes(tmp_path, task.eval())
    official = {"sky": 23, "car": 26, "road": 7}  # cityscapesScripts helpers/labels.py
    expected_ids = torch.tensor([official[name] for name in task.class_names], dtype=torch.uint8)
    for image in sorted((tmp_path / "leftImg8bit").iterdir()):
        pixels = torch.from_numpy(np.asarray(Image.open(image)).copy()).permute(2, 0, 1)
        with torch.no_grad():
            classes = task(presets.segmentation_eval()(pixels)[None]).argmax(1)[0]
        written = torch.from_numpy(np.asarray(Image.open(out / "labels" / image.name)).copy())
        assert torch.equal(written, expected_ids[classes])


def test_a_model_without_class_names_is_refused_in_cityscapes_mode(tmp_path: Path) -> None:
    task = SegmentationTask(num_classes=19, output_stride=16, example_size=(32, 48))
    with pytest.raises(SystemExit, match=r"cityscapes: true needs a model with class_names.*--data.class_names"):
        _predict_cityscapes(tmp_path, task)
    assert not (tmp_path / "out").exists()
