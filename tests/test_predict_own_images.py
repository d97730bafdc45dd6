"""`refvision predict` on a plain folder of unlabelled images, for all three tasks, through the CLI.

Each writer's output is checked against the model run here on the images read independently
(Pillow + the task's preset), so a wrong file, order, preprocessing or number fails. The class
names (and the palette) come from the checkpoint, as ``refvision fit`` stores them.
"""

import csv
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from predict_process import predict_folder, task_checkpoint

from refvision.data import presets
from refvision.data.cityscapes_labels import PALETTE, TRAIN_CLASSES
from refvision.data.voc_format import VOC_CLASSES
from refvision.tasks.classification import ClassificationTask
from refvision.tasks.detection import DetectionTask
from refvision.tasks.segmentation import SegmentationTask

IMAGES = {  # relative path -> (H, W): nested folders, odd sizes, five formats
    "a.jpg": (40, 52),
    "street/b.png": (33, 47),
    "street/night/c.bmp": (64, 64),
    "d.tif": (30, 70),
    "street/e.webp": (48, 36),
}
CLASS_NAMES = ["ant", "bee", "cat", "dog", "eel", "fox"]


def _write_images(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name, size in IMAGES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / name, quality=95)
    (root / "street" / "notes.txt").write_text("not an image")
    return root


def _read(root: Path, name: str) -> torch.Tensor:
    """``(3, H, W) uint8``, read with Pillow alone."""
    return torch.from_numpy(np.asarray(Image.open(root / name).convert("RGB")).copy()).permute(2, 0, 1)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_images(tmp_path_factory.mktemp("own_images"))


def _top5_rows(out: Path) -> list[list[str]]:
    with (out / "predictions.csv").open() as f:
        return list(csv.reader(f))


def test_classification_csv_has_top5_per_file(tmp_path: Path, images: Path) -> None:
    torch.manual_seed(0)
    task = ClassificationTask(backbone="resnet18", num_classes=6, class_names=CLASS_NAMES, image_size=64).eval()
    ckpt = task_checkpoint(task, tmp_path / "cls.ckpt")
    out = tmp_path / "out"
    predict_folder("classification", images, ckpt, out, tmp_path / "run")
    with (out / "predictions.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file"] + [f"{k}_{i}" for i in range(1, 6) for k in ("class", "prob")]
    assert [row[0] for row in rows[1:]] == sorted(IMAGES)
    transform = presets.classification_eval(32, 32)  # configs/demo/classification.yaml reads at 32
    for row in rows[1:]:
        with torch.no_grad():
            probs = task(transform(_read(images, row[0]))[None]).softmax(1)[0]
        top = probs.topk(5)
        assert row[1::2] == [CLASS_NAMES[i] for i in top.indices.tolist()]
        np.testing.assert_allclose([float(p) for p in row[2::2]], top.values.numpy(), atol=2e-6)


def test_classes_of_a_checkpoint_without_names_come_from_data_class_names(
    tmp_path: Path, images: Path, capsys: pytest.CaptureFixture
) -> None:
    torch.manual_seed(0)
    old = task_checkpoint(ClassificationTask(backbone="resnet18", num_classes=6, image_size=64), tmp_path / "old.ckpt")
    predict_folder("classification", images, old, tmp_path / "ids", tmp_path / "run")
    assert set(_top5_rows(tmp_path / "ids")[1][1::2]) <= {str(i) for i in range(6)}  # numbers: no names known
    predict_folder(
        "classification",
        images,
        old,
        tmp_path / "named",
        tmp_path / "run",
        "--data.class_names",
        json.dumps(CLASS_NAMES),
    )
    assert set(_top5_rows(tmp_path / "named")[1][1::2]) <= set(CLASS_NAMES)
    named = task_checkpoint(
        ClassificationTask(backbone="resnet18", num_classes=6, class_names=CLASS_NAMES, image_size=64),
        tmp_path / "named.ckpt",
    )
    other = ["a", "b", "c", "d", "e", "f"]
    with pytest.raises(SystemExit):
        predict_folder(
            "classification",
            images,
            named,
            tmp_path / "other",
            tmp_path / "run",
            "--data.class_names",
            json.dumps(other),
        )
    assert re.search(
        r"model\.class_names=\['ant', .*\] but the data \(PredictImagesDataModule\) has "
        r"class_names=\['a', .*--ckpt_path: the checkpoint was trained on other data",
        capsys.readouterr().err,
    )


def test_detection_json_boxes_and_threshold(tmp_path: Path, images: Path) -> None:
    torch.manual_seed(0)
    task = DetectionTask(image_size=64, norm_momentum=0.2, class_names=["__background__", *VOC_CLASSES]).eval()
    with torch.no_grad():  # an untrained head scores every class 1/21: spread the scores
        for param in task.model.head.classification_head.parameters():
            param.normal_(0.0, 0.3)
    ckpt = task_checkpoint(task, tmp_path / "det.ckpt")
    expected = {}
    for name in IMAGES:
        with torch.no_grad():
            expected[name] = task([_read(images, name).float() / 255])[0]
    scores = torch.cat([d["scores"] for d in expected.values()])
    assert len(scores) > 10
    # A threshold in the widest gap between the middle scores, so that float noise of batched
    # inference cannot move a detection across it.
    ordered = scores.sort().values
    middle = torch.arange(len(ordered) // 4, 3 * len(ordered) // 4)
    gap = int(middle[(ordered[middle + 1] - ordered[middle]).argmax()])
    threshold = float(ordered[gap] + ordered[gap + 1]) / 2
    out = tmp_path / "out"
    predict_folder(
        "detection",
        images,
        ckpt,
        out,
        tmp_path / "run",
        "--data.image_size",
        "64",
        "--trainer.callbacks.score_threshold",
        str(threshold),
    )
    records = json.loads((out / "detections.json").read_text())
    assert [r["file"] for r in records] == sorted(IMAGES)
    for record in records:
        det = expected[record["file"]]
        keep = det["scores"] >= threshold
        assert record["labels"] == det["labels"][keep].tolist()
        np.testing.assert_allclose(record["scores"], det["scores"][keep].numpy(), atol=1e-4)
        np.testing.assert_allclose(np.array(record["boxes"]).reshape(-1, 4), det["boxes"][keep].numpy(), atol=0.01)
        assert all(name != "__background__" for name in record["class_names"])
        stem = record["file"].rsplit(".", 1)[0]
        drawn = Image.open(out / "boxes" / f"{stem}.png")
        assert drawn.size[::-1] == IMAGES[record["file"]]
    coco = json.loads((out / "coco_results.json").read_text())
    assert len(coco) == len(scores)  # every detection, not only those above the threshold
    assert sum(len(r["scores"]) for r in records) == int((scores >= threshold).sum()) < len(scores)


@pytest.mark.slow
def test_segmentation_any_size_with_slide_flip_and_scales(tmp_path: Path, images: Path) -> None:
    torch.manual_seed(0)
    task = SegmentationTask(
        output_stride=16,
        example_size=(64, 64),
        inference="slide",
        slide_crop=(32, 32),
        slide_stride=(24, 24),
        flip=True,
        scales=(0.75, 1.0),
        class_names=list(TRAIN_CLASSES),
        palette=list(PALETTE),
    ).eval()
    ckpt = task_checkpoint(task, tmp_path / "seg.ckpt")
    out = tmp_path / "out"
    predict_folder(
        "segmentation",
        images,
        ckpt,
        out,
        tmp_path / "run",
        "--model.inference",
        "slide",
        "--model.slide_crop",
        "[32,32]",
        "--model.slide_stride",
        "[24,24]",
        "--model.flip",
        "true",
        "--model.scales",
        "[0.75,1.0]",
    )
    to_float = presets.segmentation_eval()
    palette = torch.tensor(PALETTE, dtype=torch.uint8)
    for name, size in IMAGES.items():
        stem = name.rsplit(".", 1)[0]
        labels = torch.from_numpy(np.asarray(Image.open(out / "labels" / f"{stem}.png")).copy())
        with torch.no_grad():
            expected = task(to_float(_read(images, name))[None]).argmax(1)[0]
        assert labels.shape == size
        assert torch.equal(labels.long(), expected)
        color = torch.from_numpy(np.asarray(Image.open(out / "color" / f"{stem}.png")).copy())
        assert torch.equal(color, palette[expected])
        overlay = Image.open(out / "overlay" / f"{stem}.png")  # the image, then the legend band below it
        assert overlay.height > size[0] and overlay.width >= size[1]
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == sorted(
        f"{folder}/{n.rsplit('.', 1)[0]}.png" for n in IMAGES for folder in ("labels", "color", "overlay")
    )


@pytest.mark.slow
@pytest.mark.parametrize("task_name", ["classification", "segmentation"])
def test_writers_refuse_existing_outputs_unless_overwrite(
    tmp_path: Path, images: Path, task_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    if task_name == "classification":
        task, probe = ClassificationTask(backbone="resnet18", num_classes=4, image_size=64), "predictions.csv"
    else:
        task, probe = SegmentationTask(output_stride=16, example_size=(64, 64)), "labels/street/b.png"
    ckpt = task_checkpoint(task, tmp_path / "model.ckpt")
    out = tmp_path / "out"
    (out / probe).parent.mkdir(parents=True)
    (out / probe).write_bytes(b"earlier result")  # the one file of a run that is already there
    with pytest.raises(SystemExit) as refused:
        predict_folder(task_name, images, ckpt, out, tmp_path / "run")
    assert refused.value.code == 2
    # One line, no traceback: the command, the folder, the file found and both ways out.
    assert re.fullmatch(
        rf"refvision predict: error: output_dir {out} already holds 1 of the files .*\({out / probe}\); "
        r"choose another folder \(--trainer.callbacks.output_dir\) or pass --trainer.callbacks.overwrite true .*\n",
        capsys.readouterr().err.splitlines(keepends=True)[-1],
    )
    assert (out / probe).read_bytes() == b"earlier result"  # refused before writing anything
    assert [p for p in out.rglob("*") if p.is_file()] == [out / probe]
    predict_folder(task_name, images, ckpt, out, tmp_path / "run", "--trainer.callbacks.overwrite", "true")
    assert (out / probe).read_bytes() != b"earlier result"


def test_detection_writer_refuses_an_existing_devkit_file(
    tmp_path: Path, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = task_checkpoint(
        DetectionTask(image_size=64, class_names=["__background__", *VOC_CLASSES]), tmp_path / "det.ckpt"
    )
    taken = tmp_path / "out" / "results" / "VOC2007" / "Main" / "comp4_det_test_car.txt"
    taken.parent.mkdir(parents=True)
    taken.write_text("000001 0.9 1 1 5 5\n")
    with pytest.raises(SystemExit):
        predict_folder(
            "detection",
            images,
            ckpt,
            tmp_path / "out",
            tmp_path / "run",
            "--data.image_size",
            "64",
            "--trainer.callbacks.voc_set",
            "2007-test",
        )
    assert "comp4_det_test_car.txt" in capsys.readouterr().err
    assert taken.read_text() == "000001 0.9 1 1 5 5\n"
    assert not (tmp_path / "out" / "detections.json").exists()


def _classifier(tmp_path: Path) -> Path:
    return task_checkpoint(ClassificationTask(backbone="resnet18", num_classes=4, image_size=64), tmp_path / "cls.ckpt")


def test_duplicate_stems_are_refused_only_where_outputs_collide_and_all_at_once(tmp_path: Path) -> None:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    names = ["same.jpg", "same.png", "sub/other.bmp", "sub/other.png", "sub/other.tif", "unique.jpg"]
    for name in names:
        Image.new("RGB", (16, 16)).save(root / name)
    predict_folder("classification", root, _classifier(tmp_path), tmp_path / "out", tmp_path / "run")
    assert sorted(row[0] for row in _top5_rows(tmp_path / "out")[1:]) == names  # the CSV keeps full names
    detector = task_checkpoint(
        DetectionTask(image_size=64, class_names=["__background__", *VOC_CLASSES]), tmp_path / "d"
    )
    with pytest.raises(SystemExit, match="2 output name") as error:  # boxes/<name>.png, COCO image ids
        predict_folder("detection", root, detector, tmp_path / "det", tmp_path / "run")
    groups = f"'same': {root / 'same.jpg'}, {root / 'same.png'}; 'sub/other': " + ", ".join(
        str(root / f"sub/other.{suffix}") for suffix in ("bmp", "png", "tif")
    )
    assert groups in str(error.value)
    assert not (tmp_path / "det").exists()


def test_bad_images_under_skip_are_left_out_and_the_rest_keep_their_names(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(6):
        Image.fromarray(rng.integers(0, 255, (40 + index, 48, 3), dtype=np.uint8)).save(
            root / f"{index}.jpg", quality=95
        )
    (root / "sub" / "text.jpg").write_text("not a jpeg")  # found at setup, from its first bytes
    (root / "sub" / "empty.png").write_bytes(b"")
    truncated = root / "2.jpg"
    truncated.write_bytes(truncated.read_bytes()[:300])  # its header is intact: found when decoded
    (root / "notes.txt").write_text("shot on a phone")
    (root / "sub" / "list.csv").write_text("a,b")
    torch.manual_seed(0)
    task = ClassificationTask(backbone="resnet18", num_classes=6, class_names=CLASS_NAMES, image_size=64).eval()
    ckpt, out = task_checkpoint(task, tmp_path / "cls.ckpt"), tmp_path / "out"
    with pytest.raises(SystemExit, match="2 bad file") as error:
        predict_folder("classification", root, ckpt, out, tmp_path / "run")
    assert f"{root / 'sub' / 'empty.png'}: the file is empty" in str(error.value)
    assert str(root / "sub" / "text.jpg") in str(error.value)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="refvision"):
        predict_folder(
            "classification",
            root,
            ckpt,
            out,
            tmp_path / "run",
            "--data.on_bad_sample",
            "skip",
            "--data.batch_size",
            "2",
        )
    rows = _top5_rows(out)[1:]
    assert [row[0] for row in rows] == ["0.jpg", "1.jpg", "3.jpg", "4.jpg", "5.jpg"]
    transform = presets.classification_eval(32, 32)  # configs/demo/classification.yaml reads at 32
    for row in rows:  # each row holds its own file's prediction, though a sample left its batch
        with torch.no_grad():
            top = task(transform(_read(root, row[0]))[None]).softmax(1)[0].topk(5)
        assert row[1::2] == [CLASS_NAMES[i] for i in top.indices.tolist()], row
        np.testing.assert_allclose([float(p) for p in row[2::2]], top.values.numpy(), atol=2e-6)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("2 file(s) are not images (.csv, .txt)" in m for m in messages) == 1
    assert any("skipped 1 bad sample(s)" in m and str(truncated) in m for m in messages)


def test_undecodable_and_missing_images_name_the_file(tmp_path: Path) -> None:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(root / "good.png")
    (root / "sub" / "broken.jpg").write_bytes(b"not a jpeg at all")
    ckpt = _classifier(tmp_path)
    with pytest.raises(SystemExit, match=r"sub/broken\.jpg: cannot read image"):
        predict_folder("classification", root, ckpt, tmp_path / "out", tmp_path / "run")
    (root / "sub" / "broken.jpg").unlink()
    (root / "good.png").unlink()
    with pytest.raises(SystemExit, match=rf"predict folder {root} holds no image files"):
        predict_folder("classification", root, ckpt, tmp_path / "out", tmp_path / "run")
