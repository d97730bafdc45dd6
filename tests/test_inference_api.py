"""The Python inference API (`refvision.inference.Predictor`) against `refvision predict`'s written outputs.

For each task the predictor's results on a folder of images equal what `refvision predict` writes for the
same checkpoint (the CSV's top-k, the JSON's boxes, the label and colour PNGs); every accepted kind of
input gives the result of its file; bad inputs are one-line errors naming them.
"""

import ast
import csv
import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from predict_process import predict_folder, task_checkpoint
from torchvision.transforms.v2 import functional as F

import refvision.inference
from refvision.app.cli import main
from refvision.checkpoints.deploy import reparameterize_checkpoint
from refvision.checkpoints.loading import CheckpointError
from refvision.data import presets
from refvision.data.cityscapes_labels import PALETTE, TRAIN_CLASSES
from refvision.data.voc_format import VOC_CLASSES
from refvision.inference import ClassificationResult, DetectionResult, Predictor, SegmentationResult
from refvision.tasks.classification import ClassificationTask
from refvision.tasks.detection import DetectionTask
from refvision.tasks.segmentation import SegmentationTask

IMAGES = {"a.jpg": (40, 52), "sub/b.png": (33, 47), "c.bmp": (30, 44)}  # relative path -> (H, W)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, size in IMAGES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / name, quality=95)
    return root


def _files(images: Path) -> list[Path]:
    """The images in ``refvision predict``'s order (sorted relative paths)."""
    return [images / name for name in sorted(IMAGES)]


def _png(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path)).copy())


def test_classification_results_equal_the_predict_csv(
    tmp_path: Path, images: Path, image_folder_template: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A checkpoint of a real `refvision fit`: it records its data module's resize size and interpolation.
    fit_args = ["--data.image_size", "32", "--data.resize_size", "40", "--data.interpolation", "bicubic"]
    main(
        [
            "fit",
            "-c",
            "configs/demo/classification.yaml",
            "--data.root",
            str(image_folder_template),
            *fit_args,
            "--data.batch_size",
            "4",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "1",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path / "fit"),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    ckpt = next((tmp_path / "fit").rglob("best.ckpt"))
    predict_folder("classification", images, ckpt, tmp_path / "out", tmp_path / "run", *fit_args)
    with (tmp_path / "out" / "predictions.csv").open() as f:
        rows = list(csv.reader(f))[1:]
    caplog.clear()
    predictor = Predictor.from_checkpoint(ckpt)
    assert not caplog.records  # the checkpoint said how it resizes: nothing to warn about
    assert predictor.preprocessing.resize_size == 40 and predictor.preprocessing.interpolation == "bicubic"
    assert predictor.class_names == ("circle", "square")
    results = predictor(_files(images))
    assert [row[0] for row in rows] == sorted(IMAGES)
    for row, result in zip(rows, results, strict=True):
        assert isinstance(result, ClassificationResult)
        assert [score.name for score in result.top_k] == row[1::2]
        assert [f"{score.prob:.6f}" for score in result.top_k] == row[2::2]
        assert [predictor.class_names[score.label] for score in result.top_k] == row[1::2]
    # Another resize than the checkpoint's changes the numbers: the comparison above can fail.
    other = Predictor.from_checkpoint(ckpt, resize_size=32, interpolation="bilinear")(_files(images))
    assert [f"{s.prob:.6f}" for r in other for s in r.top_k] != [p for row in rows for p in row[2::2]]
    # Its deploy checkpoint keeps the data module's settings: it preprocesses the same way.
    reparameterize_checkpoint(ckpt, tmp_path / "deploy.ckpt")
    caplog.clear()
    deployed = Predictor.from_checkpoint(tmp_path / "deploy.ckpt")
    assert not caplog.records
    assert deployed.preprocessing == predictor.preprocessing


def test_detection_results_equal_the_predict_json(tmp_path: Path, images: Path) -> None:
    torch.manual_seed(0)
    task = DetectionTask(image_size=64, norm_momentum=0.2, class_names=["__background__", *VOC_CLASSES])
    with torch.no_grad():  # an untrained head scores every class 1/21: spread the scores
        for param in task.model.head.classification_head.parameters():
            param.normal_(0.0, 0.3)
    ckpt = task_checkpoint(task, tmp_path / "det.ckpt")
    threshold = 0.2
    predict_folder(
        "detection",
        images,
        ckpt,
        tmp_path / "out",
        tmp_path / "run",
        "--data.image_size",
        "64",
        "--trainer.callbacks.score_threshold",
        str(threshold),
    )
    records = json.loads((tmp_path / "out" / "detections.json").read_text())
    predictor = Predictor.from_checkpoint(ckpt, score_threshold=threshold)
    assert predictor.preprocessing.image_size == (64, 64)
    results = predictor(_files(images))
    assert sum(len(r) for r in results) > 5
    for record, result in zip(records, results, strict=True):
        assert isinstance(result, DetectionResult)
        assert record["labels"] == result.labels.tolist()
        assert record["class_names"] == list(result.class_names)
        assert record["scores"] == [round(s, 4) for s in result.scores.tolist()]
        assert record["boxes"] == [[round(v, 2) for v in box] for box in result.boxes.tolist()]
        assert bool((result.scores >= threshold).all())
        height, width = IMAGES[record["file"]]  # boxes in the original image's pixels
        assert float(result.boxes[:, 2].max()) <= width and float(result.boxes[:, 3].max()) <= height


def _spread(task: SegmentationTask) -> SegmentationTask:
    """An untrained segmenter's bias picks one class everywhere: spread its head so masks vary."""
    head = task.model.segmentation_head[0]
    with torch.no_grad():
        head.bias.zero_()
        head.weight.normal_(0.0, 1.0)
    return task


@pytest.mark.slow
def test_segmentation_results_equal_the_predict_pngs(tmp_path: Path, images: Path) -> None:
    torch.manual_seed(0)
    task = _spread(
        SegmentationTask(
            output_stride=16, example_size=(64, 64), class_names=list(TRAIN_CLASSES), palette=list(PALETTE)
        )
    )
    ckpt = task_checkpoint(task, tmp_path / "seg.ckpt")  # its run options: whole image, no flip
    run = ["--model.inference", "slide", "--model.slide_crop", "[32,32]", "--model.slide_stride", "[24,24]"]
    predict_folder("segmentation", images, ckpt, tmp_path / "out", tmp_path / "run", *run, "--model.flip", "true")
    options = {"inference": "slide", "slide_crop": (32, 32), "slide_stride": (24, 24), "flip": True}
    predictor = Predictor.from_checkpoint(ckpt, options=options)
    results = predictor(_files(images))
    for name, result in zip(sorted(IMAGES), results, strict=True):
        assert isinstance(result, SegmentationResult)
        stem = name.rsplit(".", 1)[0]
        assert result.mask.dtype == torch.uint8 and tuple(result.mask.shape) == IMAGES[name]
        assert torch.equal(result.mask, _png(tmp_path / "out" / "labels" / f"{stem}.png"))
        assert torch.equal(result.color_image().permute(1, 2, 0), _png(tmp_path / "out" / "color" / f"{stem}.png"))
        assert result.class_names == tuple(TRAIN_CLASSES)
        assert len(result.mask.unique()) > 3
    # Without the options the checkpoint's own (whole image) runs: the masks differ, so the options reached it.
    whole = Predictor.from_checkpoint(ckpt)(_files(images))
    assert any(not torch.equal(a.mask, b.mask) for a, b in zip(whole, results))


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    task = ClassificationTask(backbone="resnet18", num_classes=6, image_size=32, class_names=list("abcdef"))
    return task_checkpoint(task, tmp_path_factory.mktemp("classifier") / "cls.ckpt")


def _every_kind(path: Path) -> dict[str, object]:
    """``path``'s image as each accepted kind of input."""
    pil = Image.open(path)
    array = np.asarray(pil.convert("RGB"))
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
    return {
        "str": str(path),
        "Path": path,
        "PIL": pil,
        "numpy": array,
        "tensor": tensor,
        "non-contiguous numpy": np.asfortranarray(array),
    }


def test_every_kind_of_input_gives_the_result_of_its_file(classifier: Path, images: Path) -> None:
    predictor = Predictor.from_checkpoint(classifier, resize_size=32)
    path = images / "sub" / "b.png"
    kinds = _every_kind(path)
    results = dict(zip(kinds, predictor(list(kinds.values()))))
    assert all(results[kind] == results["str"] for kind in kinds), results
    single = predictor(kinds["numpy"])  # one image in, one result out
    assert single == predictor(str(path))  # (a batch of one: float sums in another order than a batch of six)
    # A float tensor in [0, 1] is the same image; the resize then runs in float, not uint8: close, not equal.
    floats = predictor(F.to_dtype(kinds["tensor"], torch.float32, scale=True))
    assert [s.label for s in floats.top_k] == [s.label for s in single.top_k]
    np.testing.assert_allclose([s.prob for s in floats.top_k], [s.prob for s in single.top_k], atol=1e-3)


def test_a_pil_image_is_taken_as_displayed_like_its_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    predictor = Predictor(_spread(SegmentationTask(num_classes=3, output_stride=16, example_size=(32, 32))))
    pixels = np.random.default_rng(1).integers(0, 255, (24, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(tmp_path / "phone.png", exif=exif)
    from_file, from_pil = predictor([tmp_path / "phone.png", Image.open(tmp_path / "phone.png")])
    assert tuple(from_file.mask.shape) == (40, 24)  # as displayed
    assert torch.equal(from_file.mask, from_pil.mask) and len(from_file.mask.unique()) > 1
    assert torch.equal(from_file.mask, predictor(np.ascontiguousarray(np.rot90(pixels, k=-1))).mask)


def test_transforms_preprocessing_and_batch_size(classifier: Path, images: Path) -> None:
    predictor = Predictor.from_checkpoint(classifier, resize_size=36, interpolation="bicubic", batch_size=2)
    assert predictor.preprocessing == refvision.inference.Preprocessing(
        "classification", 32, 36, "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    )
    image = torch.from_numpy(np.asarray(Image.open(images / "sub" / "b.png")).copy()).permute(2, 0, 1)
    expected = presets.classification_eval(32, 36, "bicubic")(image)
    assert torch.equal(predictor.transforms(image), expected)
    batched = predictor(_files(images))  # batches of 2, 1
    one_by_one = [predictor(path) for path in _files(images)]
    for a, b in zip(batched, one_by_one, strict=True):
        assert [s.label for s in a.top_k] == [s.label for s in b.top_k]
        np.testing.assert_allclose([s.prob for s in a.top_k], [s.prob for s in b.top_k], atol=1e-6)
    assert predictor([]) == []


@pytest.mark.slow
def test_a_deploy_checkpoint_predicts_as_its_training_form(
    tmp_path: Path, images: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    task = ClassificationTask(backbone="resnet18", num_classes=4, image_size=32, conv={"kind": "refconv"})
    with torch.no_grad():  # a trained transform: the deploy form folds something
        for name, param in task.model.named_parameters():
            if "refocus" in name or "transform" in name:
                param.normal_(0.0, 0.02)
    train = task_checkpoint(task, tmp_path / "train.ckpt")
    reparameterize_checkpoint(train, tmp_path / "deploy.ckpt")
    caplog.clear()
    deployed = Predictor.from_checkpoint(tmp_path / "deploy.ckpt")
    assert "resizing the shorter side to 36 (image_size 32 x 256 / 224)" in caplog.text
    assert deployed.preprocessing.resize_size == 36
    trained = Predictor.from_checkpoint(train)(_files(images))
    for a, b in zip(trained, deployed(_files(images)), strict=True):
        assert [s.label for s in a.top_k] == [s.label for s in b.top_k]
        np.testing.assert_allclose([s.prob for s in a.top_k], [s.prob for s in b.top_k], atol=1e-4)


class Payload:
    """Creates ``marker`` when unpickled: what a checkpoint must never do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))


def test_a_url_is_downloaded_once_and_read_weights_only(
    served: tuple[Path, str], tmp_path: Path, classifier: Path, images: Path
) -> None:
    www, url = served
    (www / "cls.ckpt").write_bytes(classifier.read_bytes())
    local = Predictor.from_checkpoint(classifier, resize_size=32)(_files(images))
    assert Predictor.from_checkpoint(f"{url}/cls.ckpt", resize_size=32)(_files(images)) == local
    cached = list((tmp_path / "torch_home" / "hub" / "checkpoints" / "by-url").rglob("cls.ckpt"))
    assert len(cached) == 1
    (www / "cls.ckpt").unlink()  # the server no longer has it: the checked copy is used
    assert Predictor.from_checkpoint(f"{url}/cls.ckpt", resize_size=32)(_files(images)) == local
    checkpoint = torch.load(classifier, weights_only=True)
    checkpoint["callbacks"] = {"evil": Payload(tmp_path / "ran")}
    torch.save(checkpoint, www / "evil.ckpt")
    with pytest.raises(CheckpointError, match=r"checkpoint http://127\.0\.0\.1:\d+/evil\.ckpt .*needs pickle"):
        Predictor.from_checkpoint(f"{url}/evil.ckpt")
    assert not (tmp_path / "ran").exists()


def _one_line_error(expected: type[BaseException], pattern: str, call: object, *args: object) -> None:
    with pytest.raises(expected) as error:
        call(*args)  # type: ignore[operator]
    message = str(error.value)
    assert "\n" not in message and re.search(pattern, message), message


def test_bad_inputs_are_one_line_errors_naming_them(classifier: Path, images: Path, tmp_path: Path) -> None:
    predictor = Predictor.from_checkpoint(classifier, resize_size=32)
    good = images / "a.jpg"
    (tmp_path / "text.png").write_text("not an image")
    _one_line_error(TypeError, r"^images\[1\]: a builtins\.int; expected a file path", predictor, [good, 3])
    _one_line_error(TypeError, r"^image: a builtins\.bytes; expected", predictor, b"\x89PNG")
    _one_line_error(
        ValueError,
        r"^images\[1\]: a numpy array of shape \(32, 32\) and dtype uint8; expected \(H, W, 3\) uint8",
        predictor,
        [good, np.zeros((32, 32), np.uint8)],
    )
    _one_line_error(ValueError, r"^image: a numpy array .* dtype float64", predictor, np.zeros((8, 8, 3)))
    _one_line_error(
        ValueError,
        r"^image: a tensor of shape \(1, 3, 8, 8\).*pass list\(batch\)",
        predictor,
        torch.zeros(1, 3, 8, 8, dtype=torch.uint8),
    )
    _one_line_error(
        ValueError,
        r"^image: a floating-point tensor with values 0\.\.255; expected RGB in \[0, 1\]",
        predictor,
        torch.full((3, 8, 8), 255.0).index_fill_(1, torch.tensor([0]), 0),
    )
    _one_line_error(ValueError, rf"{re.escape(str(tmp_path / 'text.png'))}: ", predictor, tmp_path / "text.png")
    _one_line_error(FileNotFoundError, re.escape(str(tmp_path / "missing.jpg")), predictor, tmp_path / "missing.jpg")
    _one_line_error(ValueError, rf"^image: {re.escape(str(images))} is a folder", predictor, images)
    _one_line_error(ValueError, r"^image: a PIL image of mode 'I;16'", predictor, Image.new("I;16", (8, 8)))
    with pytest.raises(ValueError, match=r"^Predictor options 'backbone': not options of how ClassificationTask runs"):
        Predictor.from_checkpoint(classifier, options={"backbone": "resnet50"})
    with pytest.raises(ValueError, match=r"^Predictor: batch_size=0; expected an integer >= 1$"):
        Predictor.from_checkpoint(classifier, batch_size=0)


def _snippets() -> dict[str, str]:
    """The code blocks of :mod:`refvision.inference`'s docstring (the README's Python API section), by heading."""
    doc = refvision.inference.__doc__ or ""
    found = re.findall(r"^(\w+)::\n\n((?:    .*\n|\n)+)", doc, flags=re.MULTILINE)
    return {heading: textwrap.dedent(code) for heading, code in found}


def test_the_documented_snippets_run(
    tmp_path: Path, images: Path, classifier: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    snippets = _snippets()
    assert sorted(snippets) == ["Classification", "Detection", "Segmentation"]
    torch.manual_seed(0)
    detector = DetectionTask(image_size=64, class_names=["__background__", *VOC_CLASSES])
    with torch.no_grad():
        for param in detector.model.head.classification_head.parameters():
            param.normal_(0.0, 0.5)
    task_checkpoint(detector, tmp_path / "detector.ckpt")
    segmenter = _spread(SegmentationTask(output_stride=16, example_size=(64, 64), class_names=list(TRAIN_CLASSES)))
    task_checkpoint(segmenter, tmp_path / "segmenter.ckpt")
    (tmp_path / "classifier.ckpt").write_bytes(classifier.read_bytes())
    (tmp_path / "photo.jpg").write_bytes((images / "a.jpg").read_bytes())
    (tmp_path / "street.png").write_bytes((images / "sub" / "b.png").read_bytes())
    monkeypatch.chdir(tmp_path)
    for heading, code in snippets.items():
        capsys.readouterr()
        exec(compile(code, f"refvision.inference {heading} snippet", "exec"), {})
        lines = capsys.readouterr().out.splitlines()
        if heading == "Classification":
            assert lines[0].startswith("Preprocessing(preset='classification', image_size=32")
            assert all(re.fullmatch(r"[a-f] \([0-5]\): [01]\.\d{3}", line) for line in lines[1:]) and len(lines) == 6
        elif heading == "Detection":
            assert lines and all(re.fullmatch(r"\w+ [01]\.\d\d \[-?\d+, -?\d+, \d+, \d+\]", line) for line in lines)
        else:
            shape, names = re.fullmatch(r"(\(\d+, \d+\)) (\[.*\])", lines[0]).groups()  # type: ignore[union-attr]
            assert shape == "(33, 47)" and set(ast.literal_eval(names)) <= set(TRAIN_CLASSES)
            assert Image.open(tmp_path / "street_classes.png").size == (47, 33)
