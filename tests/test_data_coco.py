"""COCO-format detection data: the reader, its bad-input rules, the data module, and `refvision fit` / `test`
on it, whose numbers must be pycocotools' own.

The data is written in the real format: an ``instances.json`` with three categories of
non-contiguous ids declared out of order (7, 1, 3), crowd annotations, ``area`` values that are not
``w * h`` (as segmentation areas are not), image and annotation ids that are neither contiguous
nor in order, one image without annotations and one in a sub-folder, and 64 x 64 JPEGs.
"""

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.io import decode_image, write_jpeg

from refvision.app.cli import main
from refvision.app.demo.data import write_vocdevkit
from refvision.data import CocoDetection, CocoDetectionDataModule, DataDescription, VOCDataModule, detection_collate
from refvision.data.coco import read_annotation_file
from refvision.metrics import COCO_STATS
from refvision.tasks.detection import DetectionTask

SIZE = 64
CATEGORIES = [{"id": 7, "name": "triangle"}, {"id": 1, "name": "circle"}, {"id": 3, "name": "square"}]
"""Declared out of id order: the labels follow the ids (1 -> circle, 3 -> square, 7 -> triangle)."""
COLORS = {1: (220, 40, 40), 3: (40, 200, 60), 7: (40, 60, 220)}
CONFIG = "configs/detection/ssdlite320_mobilenet_v3_large_coco.yaml"


def write_coco(root: Path, num_images: int = 8, seed: int = 0) -> tuple[Path, Path]:
    """A COCO detection set under ``root``: ``(instances.json, image folder)`` (see the module docstring).

    Objects are filled rectangles of their category's colour on noise. Every image but the
    first has 1-3 objects; every third object is a crowd region; some boxes have fractional
    coordinates.
    """
    rng = np.random.default_rng(seed)
    images_dir = root / "images"
    images, annotations = [], []
    for index in range(num_images):
        image_id = 1000 - 37 * index  # not contiguous, descending in the file
        file_name = f"sub/img_{index}.jpg" if index == 2 else f"img_{index}.jpg"
        pixels = rng.integers(90, 140, size=(3, SIZE, SIZE), dtype=np.uint8)
        for _ in range(0 if index == 0 else int(rng.integers(1, 4))):
            category = int(rng.choice([1, 3, 7]))
            w, h = (float(rng.integers(12, 44)) + 0.5 * float(rng.integers(0, 2)) for _ in range(2))
            x, y = float(rng.integers(0, SIZE - int(w))), float(rng.integers(0, SIZE - int(h)))
            pixels[:, int(y) : int(y + h), int(x) : int(x + w)] = torch.tensor(COLORS[category])[:, None, None].numpy()
            annotations.append(
                {
                    "id": 5000 + 3 * len(annotations),
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [x, y, w, h],
                    "area": round(0.8 * w * h, 2),
                    "iscrowd": int(len(annotations) % 3 == 2),
                    "segmentation": [[x, y, x + w, y, x + w, y + h]],
                }
            )
        path = images_dir / file_name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jpeg(torch.from_numpy(pixels), str(path), quality=95)
        images.append({"id": image_id, "file_name": file_name, "width": SIZE, "height": SIZE})
    annotation_file = root / "instances.json"
    annotation_file.write_text(
        json.dumps({"info": {}, "images": images, "annotations": annotations, "categories": CATEGORIES})
    )
    return annotation_file, images_dir


@pytest.fixture(scope="module")
def coco_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_coco(tmp_path_factory.mktemp("coco"))


@pytest.fixture()
def damaged(tmp_path: Path) -> tuple[Path, Path]:
    """A fresh set the test may damage."""
    return write_coco(tmp_path / "coco")


def _edit(annotation_file: Path, change) -> None:
    data = json.loads(annotation_file.read_text())
    change(data)
    annotation_file.write_text(json.dumps(data))


# ----------------------------------------------------------------------------------------- reading


def test_categories_become_contiguous_labels_in_id_order(coco_data: tuple[Path, Path]) -> None:
    coco_file = read_annotation_file(coco_data[0])
    assert coco_file.category_ids == (1, 3, 7)
    assert coco_file.class_names == ("__background__", "circle", "square", "triangle")
    module = CocoDetectionDataModule(*map(str, coco_data), num_workers=0)
    assert module.num_classes == 4 and module.class_names == ["__background__", "circle", "square", "triangle"]
    assert module.category_ids == [1, 3, 7] and module.protocol == "coco"
    assert module.mean is None and module.std is None


def test_samples_hold_every_annotation_as_the_file_gives_it(coco_data: tuple[Path, Path]) -> None:
    annotation_file, images_dir = coco_data
    raw = json.loads(annotation_file.read_text())
    label_of = {1: 1, 3: 2, 7: 3}
    dataset = CocoDetection(annotation_file, images_dir)
    assert [image.image_id for image in dataset.images] == [image["id"] for image in raw["images"]]
    for index, info in enumerate(raw["images"]):
        image, target = dataset[index]
        expected = torch.from_numpy(np.asarray(decode_image(str(images_dir / info["file_name"]))))
        assert torch.equal(image.as_subclass(torch.Tensor), expected)
        anns = [a for a in raw["annotations"] if a["image_id"] == info["id"]]
        assert target["image_id"] == info["id"]
        assert target["annotation_id"].tolist() == [a["id"] for a in anns]
        assert target["bbox"].dtype == torch.float64 and target["bbox"].tolist() == [a["bbox"] for a in anns]
        assert target["area"].tolist() == [a["area"] for a in anns]
        assert target["iscrowd"].tolist() == [bool(a["iscrowd"]) for a in anns]
        assert target["labels"].tolist() == [label_of[a["category_id"]] for a in anns]
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        assert target["boxes"].tolist() == xyxy and target["boxes"].canvas_size == (SIZE, SIZE)
    assert dataset.source(2).name.as_posix() == "sub/img_2"


def test_training_targets_leave_crowd_regions_out(coco_data: tuple[Path, Path]) -> None:
    annotation_file, images_dir = coco_data
    raw = json.loads(annotation_file.read_text())
    assert any(a["iscrowd"] for a in raw["annotations"])
    dataset = CocoDetection(annotation_file, images_dir, evaluation=False)
    for index, info in enumerate(raw["images"]):
        _, target = dataset[index]
        regular = [a for a in raw["annotations"] if a["image_id"] == info["id"] and not a["iscrowd"]]
        assert sorted(target) == ["boxes", "image_id", "labels", "orig_size"]
        assert target["boxes"].tolist() == [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in regular)]


def test_boxes_beyond_the_image_are_clipped_for_the_model_and_kept_for_evaluation(damaged: tuple[Path, Path]) -> None:
    annotation_file, images_dir = damaged
    _edit(annotation_file, lambda d: d["annotations"][0].update(bbox=[-4.0, 50.0, 20.0, 30.0], iscrowd=0))
    dataset = CocoDetection(annotation_file, images_dir)
    index = next(i for i, image in enumerate(dataset.images) if 5000 in image.annotation_ids.tolist())
    _, target = dataset[index]
    assert target["boxes"][0].tolist() == [0.0, 50.0, 16.0, 64.0]
    assert target["bbox"][0].tolist() == [-4.0, 50.0, 20.0, 30.0]


def test_the_data_module_gives_batches_of_every_split(coco_data: tuple[Path, Path]) -> None:
    paths = [str(p) for p in coco_data]
    module = CocoDetectionDataModule(*paths, *paths, *paths, batch_size=3, num_workers=0, pin_memory=False)
    module.setup("fit")
    images, targets = next(iter(module.train_dataloader()))
    assert len(images) == len(targets) == 3 and all(image.dtype == torch.float32 for image in images)
    assert all("iscrowd" not in target for target in targets)
    module.setup("test")
    batches = list(module.test_dataloader())
    assert sum(len(images) for images, _ in batches) == 8 and "iscrowd" in batches[0][1][0]
    assert detection_collate is CocoDetectionDataModule.collate_fn


def test_a_split_without_one_of_its_paths_or_needed_by_the_stage_is_refused(coco_data: tuple[Path, Path]) -> None:
    annotations, images = map(str, coco_data)
    with pytest.raises(ValueError, match=r"^data\.val_images is not set; expected data\.val_annotations and"):
        CocoDetectionDataModule(annotations, images, val_annotations=annotations)
    module = CocoDetectionDataModule(annotations, images, num_workers=0)
    with pytest.raises(ValueError, match=r"^data\.val_annotations is not set; fit needs the val split"):
        module.setup("fit")


def test_splits_must_declare_the_same_categories(coco_data: tuple[Path, Path], damaged: tuple[Path, Path]) -> None:
    _edit(damaged[0], lambda d: d["categories"][0].update(id=8))
    _edit(damaged[0], lambda d: [a.update(category_id=8) for a in d["annotations"] if a["category_id"] == 7])
    with pytest.raises(ValueError, match=r"declares the categories 1: circle, 3: square, 8: triangle but .* declares "):
        CocoDetectionDataModule(*map(str, coco_data), *map(str, damaged))


# ----------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["images"][3].update(id=d["images"][1]["id"]), r"image id 963 is listed twice \(images\[1\] and "),
        (lambda d: d["annotations"][2].update(id=5000), r"annotation id 5000 is given twice"),
        (
            lambda d: d["annotations"][1].update(category_id=2),
            r"annotation id 5003: category_id 2 is not declared in 'categories'; expected one of 1, 3, 7",
        ),
        (lambda d: d["annotations"][1].update(image_id=4), r"annotation id 5003: image_id 4 is not in 'images'"),
        (lambda d: d["categories"].append({"id": 3, "name": "x"}), r"category id 3 is declared twice"),
        (lambda d: d["categories"].append({"id": 9, "name": "circle"}), r"category name 'circle' is given to ids 1 "),
        (lambda d: d.pop("categories"), r"'categories' is missing; expected a list of objects"),
        (lambda d: d["images"][0].update(id="a"), r"images\[0\] 'id' is 'a'; expected an integer"),
        (lambda d: d["images"][0].update(width=0), r"image id 1000 \(img_0.jpg\) 'width' is 0; expected a positive"),
    ],
)
def test_a_fault_of_the_file_is_a_one_line_error_naming_it(damaged: tuple[Path, Path], change, message: str) -> None:
    annotation_file, images_dir = damaged
    _edit(annotation_file, change)
    for policy in ("raise", "skip"):
        with pytest.raises(ValueError, match=message) as error:
            CocoDetectionDataModule(str(annotation_file), str(images_dir), on_bad_sample=policy)
        assert str(error.value).startswith(f"{annotation_file}: ") and "\n" not in str(error.value)


def test_json_syntax_errors_name_the_file_and_the_place(damaged: tuple[Path, Path]) -> None:
    annotation_file, images_dir = damaged
    annotation_file.write_text('{"images": [],\n "annotations": [}')
    with pytest.raises(ValueError, match=r"^\S+instances\.json: not valid JSON \(.* at line 2 column 18\)"):
        CocoDetectionDataModule(str(annotation_file), str(images_dir))
    with pytest.raises(FileNotFoundError, match=r"^data\.val_annotations=\S+nothing\.json: the file does not exist"):
        CocoDetectionDataModule(val_annotations=str(images_dir / "nothing.json"), val_images=str(images_dir))
    with pytest.raises(FileNotFoundError, match=r"^data\.train_images=\S+absent: the folder does not exist"):
        CocoDetectionDataModule(str(annotation_file), str(images_dir / "absent"))


@pytest.mark.parametrize(
    ("bbox", "expected"),
    [
        ([10.0, 10.0, 0.0, 5.0], r"bbox \[10.0, 10.0, 0.0, 5.0\] has width 0.0 and height 5.0; expected both > 0"),
        ([10.0, 10.0, 5.0, -1.0], r"bbox \[10.0, 10.0, 5.0, -1.0\] has width 5.0 and height -1.0; expected both > 0"),
        ([70.0, 10.0, 5.0, 5.0], r"bbox \[70.0, 10.0, 5.0, 5.0\] lies outside the 64 x 64 image"),
        ([10.0, 10.0, 5.0], r"bbox is \[10.0, 10.0, 5.0\]; expected \[x, y, width, height\], four finite numbers"),
    ],
)
def test_a_bad_box_follows_on_bad_sample(damaged: tuple[Path, Path], bbox: list[float], expected: str, caplog) -> None:
    annotation_file, images_dir = damaged
    _edit(annotation_file, lambda d: d["annotations"][0].update(bbox=bbox))
    first = json.loads(annotation_file.read_text())["annotations"][0]
    where = rf"{annotation_file}: annotation id 5000 \(image id {first['image_id']}, img_1.jpg\): "
    with pytest.raises(ValueError, match=rf"^1 bad file\(s\) in .*\(set on_bad_sample: skip .*\): {where}{expected}"):
        CocoDetection(annotation_file, images_dir)
    with caplog.at_level(logging.WARNING, logger="refvision"):
        dataset = CocoDetection(annotation_file, images_dir, on_bad_sample="skip")
    assert len(dataset) == 7 and first["image_id"] not in [image.image_id for image in dataset.images]
    assert dataset.skipped[0][0] == str(images_dir / "img_1.jpg") and "annotation id 5000" in caplog.text


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [("iscrowd", 2, r"iscrowd is 2; expected 0 or 1"), ("area", "big", r"area is 'big'; expected a number >= 0")],
)
def test_bad_crowd_flags_and_areas_follow_on_bad_sample(
    damaged: tuple[Path, Path], field: str, value, expected
) -> None:
    annotation_file, images_dir = damaged
    _edit(annotation_file, lambda d: d["annotations"][0].update({field: value}))
    with pytest.raises(ValueError, match=rf"annotation id 5000 \(image id 963, img_1.jpg\): {expected}"):
        CocoDetection(annotation_file, images_dir)
    assert len(CocoDetection(annotation_file, images_dir, on_bad_sample="skip")) == 7


def test_a_missing_area_is_the_box_area(damaged: tuple[Path, Path]) -> None:
    annotation_file, images_dir = damaged
    _edit(annotation_file, lambda d: d["annotations"][0].pop("area"))
    dataset = CocoDetection(annotation_file, images_dir)
    image = next(image for image in dataset.images if 5000 in image.annotation_ids.tolist())
    w, h = image.bbox[0, 2:].tolist()
    assert image.area[0].item() == w * h


def test_missing_and_mis_sized_images_follow_on_bad_sample(damaged: tuple[Path, Path]) -> None:
    annotation_file, images_dir = damaged
    (images_dir / "img_3.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"^1 missing file\(s\) in .*img_3\.jpg, image id 889 of \S+, does not"):
        CocoDetection(annotation_file, images_dir)
    assert len(CocoDetection(annotation_file, images_dir, on_bad_sample="skip")) == 7
    write_jpeg(torch.zeros(3, 32, 64, dtype=torch.uint8), str(images_dir / "img_3.jpg"))
    with pytest.raises(ValueError, match=r"img_3\.jpg is 64 x 32 \(W x H\) but \S+: image id 889 \(img_3\.jpg\) says"):
        CocoDetection(annotation_file, images_dir)


def test_an_image_that_does_not_decode_follows_on_bad_sample(damaged: tuple[Path, Path]) -> None:
    annotation_file, images_dir = damaged
    path = images_dir / "img_4.jpg"
    path.write_bytes(path.read_bytes()[:200])  # header intact, data cut short
    skipping = CocoDetection(annotation_file, images_dir, on_bad_sample="skip")
    index = [image.image_path for image in skipping.images].index(path)
    assert skipping[index].path == str(path)
    with pytest.raises(ValueError, match=str(path)):
        CocoDetection(annotation_file, images_dir)[index]


def test_evaluation_sets_need_a_non_crowd_annotation(damaged: tuple[Path, Path]) -> None:
    annotation_file, images_dir = damaged
    _edit(annotation_file, lambda d: [a.update(iscrowd=1) for a in d["annotations"]])
    module = CocoDetectionDataModule(test_annotations=str(annotation_file), test_images=str(images_dir))
    with pytest.raises(ValueError, match=r"^data\.test_annotations=\S+: none of its 8 images holds an annotation"):
        module.setup("test")


# ----------------------------------------------------------------------------------------- end to end


def _args(root: Path, annotations: Path, images: Path) -> list[str]:
    splits = [
        f"--data.{split}_{kind}={path}"
        for split in ("train", "val", "test")
        for kind, path in (("annotations", annotations), ("images", images))
    ]
    return [
        "-c",
        CONFIG,
        *splits,
        "--data.batch_size=4",
        "--data.num_workers=0",
        "--data.pin_memory=false",
        "--data.image_size=64",
        "--trainer.max_epochs=1",
        "--trainer.check_val_every_n_epoch=1",
        "--trainer.limit_train_batches=2",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu",
        f"--trainer.default_root_dir={root}",
    ]


def _logged(root: Path) -> dict[str, float]:
    (path,) = root.glob("lightning_logs/version_*/metrics.csv")
    values: dict[str, float] = {}
    with path.open() as file:
        for row in csv.DictReader(file):
            values.update({key: float(value) for key, value in row.items() if value != ""})
    return values


@pytest.mark.slow
def test_fit_then_test_gives_pycocotools_numbers(
    tmp_path: Path, coco_data: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    annotations, images = coco_data
    main(["fit", *_args(tmp_path / "fit", annotations, images)])
    (best,) = (tmp_path / "fit").glob("lightning_logs/version_*/checkpoints/best.ckpt")
    hparams = torch.load(best, map_location="cpu", weights_only=True)["hyper_parameters"]
    assert hparams["protocol"] == "coco" and hparams["category_ids"] == [1, 3, 7]
    assert hparams["class_names"] == ["__background__", "circle", "square", "triangle"]

    main(["test", *_args(tmp_path / "test", annotations, images), f"--ckpt_path={best}"])
    out = tmp_path / "predictions"
    main(
        [
            "predict",
            *_args(tmp_path / "predict", annotations, images),
            f"--ckpt_path={best}",
            "--return_predictions=false",
            "--trainer.callbacks+=refvision.outputs.writers.DetectionPredictionWriter",
            f"--trainer.callbacks.output_dir={out}",
        ]
    )
    # The model's detections as a COCO results file: the writer names images by file, in category ids.
    raw = json.loads(annotations.read_text())
    image_ids = {Path(image["file_name"]).with_suffix("").as_posix(): image["id"] for image in raw["images"]}
    results = json.loads((out / "coco_results.json").read_text())
    assert results and {r["category_id"] for r in results} <= {1, 3, 7}
    for record in results:
        record["image_id"] = image_ids[record["image_id"]]
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))

    ground_truth = COCO(str(annotations))
    evaluator = COCOeval(ground_truth, ground_truth.loadRes(str(results_file)), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    logged = _logged(tmp_path / "test")
    for name, value in zip(COCO_STATS, evaluator.stats):
        expected = math.nan if value == -1 else float(np.float32(value))  # logged as float32
        assert logged[f"test/{name}"] == expected or math.isnan(expected) and math.isnan(logged[f"test/{name}"]), name
    assert any(value > 0 for value in evaluator.stats)
    table = (tmp_path / "test").glob("lightning_logs/version_*/test_per_class.csv")
    assert "triangle" in next(table).read_text()

    # The checkpoint's category ids are the data's: a file with the same names under other ids is refused.
    other, other_images = write_coco(tmp_path / "other")
    _edit(other, lambda d: d["categories"][0].update(id=8))
    _edit(other, lambda d: [a.update(category_id=8) for a in d["annotations"] if a["category_id"] == 7])
    with pytest.raises(SystemExit):
        main(["test", *_args(tmp_path / "other_test", other, other_images), f"--ckpt_path={best}"])
    assert "model.category_ids=[1, 3, 7] but the data (CocoDetectionDataModule) has category_ids=[1, 3, 8]" in (
        capsys.readouterr().err
    )


def test_a_description_gives_one_category_id_per_class_after_the_background() -> None:
    with pytest.raises(ValueError, match=r"^data category_ids has 2 ids but the data has 4 class names; expected one"):
        DataDescription(("__background__", "a", "b", "c"), category_ids=(1, 2))
    with pytest.raises(ValueError, match=r"^data category_ids=\[1, 1\]: expected distinct ids"):
        DataDescription(("__background__", "a", "b"), category_ids=(1, 1))
    with pytest.raises(ValueError, match=r"^data protocol='kitti': expected 'voc' or 'coco'"):
        DataDescription(("__background__", "a"), protocol="kitti")  # type: ignore[arg-type]


def test_voc_data_states_the_voc_protocol(tmp_path: Path) -> None:
    root = write_vocdevkit(tmp_path / "VOCdevkit", num_train=2, num_val=2, num_test=2, size=(32, 32))
    module = VOCDataModule(str(root), ["2007-train"], ["2007-val"], ["2007-test"])
    assert module.protocol == "voc" and "category_ids" not in module.description.stated()


def test_a_coco_task_needs_its_category_ids() -> None:
    with pytest.raises(ValueError, match=r"^model\.protocol=coco needs model\.category_ids, one per class after"):
        DetectionTask(num_classes=4, image_size=64, protocol="coco", category_ids=[1, 3])
