"""Demo-data writers: exact layouts, determinism, caching, refusal to overwrite."""

import hashlib
import importlib
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from refvision.app.demo.data import (
    MANIFEST,
    ensure_demo_data,
    write_cityscapes,
    write_imagefolder,
    write_vocdevkit,
)
from refvision.data.cityscapes_labels import LABEL_IDS

REPO = Path(__file__).resolve().parents[1]
SMALL_IMAGEFOLDER = dict(classes=("circle", "stripes"), train_per_class=3, val_per_class=2, test_per_class=1, size=32)
SMALL_VOC = dict(years=("2007", "2012"), num_train=4, num_val=3, num_test=2, size=(64, 64))
SMALL_CITYSCAPES = dict(num_train=3, num_val=1, num_test=2, size=(32, 64))


def _digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_imagefolder_layout(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "if", **SMALL_IMAGEFOLDER)
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    expected = {
        f"{split}/{name}/{name}_{i:04d}.{'jpg' if i % 2 == 0 else 'png'}"
        for split, count in (("train", 3), ("val", 2), ("test", 1))
        for name in ("circle", "stripes")
        for i in range(count)
    }
    assert files == expected | {MANIFEST}
    image = np.asarray(Image.open(root / "train/circle/circle_0000.jpg"))
    assert image.shape == (32, 32, 3) and image.std() > 10  # textured, not constant
    # Three independent draws: no test image repeats a val or train image.
    pixels = {
        np.asarray(Image.open(root / f"{split}/circle/circle_0000.jpg")).tobytes() for split in ("train", "val", "test")
    }
    assert len(pixels) == 3


def test_vocdevkit_layout(tmp_path: Path) -> None:
    root = write_vocdevkit(tmp_path / "VOCdevkit", **SMALL_VOC)
    for year, first in (("2007", "000001"), ("2012", "2012_000001")):
        main = root / f"VOC{year}" / "ImageSets" / "Main"
        splits = {split: (main / f"{split}.txt").read_text().split() for split in ("train", "val", "trainval", "test")}
        assert splits["trainval"][0] == first
        assert [len(splits[s]) for s in ("train", "val", "trainval", "test")] == [4, 3, 7, 2]
        assert splits["train"] + splits["val"] == splits["trainval"]
        assert not set(splits["trainval"]) & set(splits["test"])
        for image_id in splits["trainval"] + splits["test"]:
            xml = ET.parse(root / f"VOC{year}" / "Annotations" / f"{image_id}.xml").getroot()
            assert xml.findtext("folder") == f"VOC{year}" and xml.findtext("filename") == f"{image_id}.jpg"
            width, height = int(xml.findtext("size/width")), int(xml.findtext("size/height"))
            assert Image.open(root / f"VOC{year}" / "JPEGImages" / f"{image_id}.jpg").size == (width, height)
            assert xml.findtext("size/depth") == "3" and xml.findtext("segmented") == "0"
            objects = xml.findall("object")
            assert 1 <= len(objects) <= 3
            for obj in objects:
                assert obj.findtext("pose") == "Unspecified"
                assert obj.findtext("truncated") in ("0", "1") and obj.findtext("difficult") in ("0", "1")
                assert all(re.fullmatch(r"\d+", obj.findtext(f"bndbox/{t}")) for t in ("xmin", "ymin", "xmax", "ymax"))


def test_cityscapes_layout(tmp_path: Path) -> None:
    root = write_cityscapes(tmp_path / "cs", **SMALL_CITYSCAPES)
    images = sorted(p.relative_to(root).as_posix() for p in (root / "leftImg8bit").rglob("*.png"))
    assert images == [
        "leftImg8bit/test/munich/munich_000000_000019_leftImg8bit.png",
        "leftImg8bit/test/munich/munich_000001_000019_leftImg8bit.png",
        "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png",
        "leftImg8bit/train/aachen/aachen_000001_000019_leftImg8bit.png",
        "leftImg8bit/train/bochum/bochum_000000_000019_leftImg8bit.png",
        "leftImg8bit/val/frankfurt/frankfurt_000000_000019_leftImg8bit.png",
    ]
    assert (root / "gtFine/test/munich/munich_000001_000019_gtFine_labelIds.png").is_file()
    gt = root / "gtFine/train/aachen/aachen_000000_000019_gtFine"
    assert sorted(p.name for p in gt.parent.glob("aachen_000000_*")) == [
        f"aachen_000000_000019_gtFine_{kind}.png" for kind in ("color", "instanceIds", "labelIds")
    ]
    label_ids = Image.open(f"{gt}_labelIds.png")
    assert label_ids.mode == "L" and label_ids.size == (64, 32)
    values = set(np.unique(np.asarray(label_ids)).tolist())
    assert values <= LABEL_IDS and {7, 23, 26} <= values
    instances = np.asarray(Image.open(f"{gt}_instanceIds.png")).astype(np.int64)
    assert instances.max() >= 26000  # car instances as id * 1000 + k
    assert Image.open(f"{gt}_color.png").mode == "RGB"


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    first = write_vocdevkit(tmp_path / "a", **SMALL_VOC, seed=3)
    again = write_vocdevkit(tmp_path / "b", **SMALL_VOC, seed=3)
    other = write_vocdevkit(tmp_path / "c", **SMALL_VOC, seed=4)
    assert _digests(first) == _digests(again)
    image = "VOC2007/JPEGImages/000001.jpg"
    assert _digests(first)[image] != _digests(other)[image]
    city_a = write_cityscapes(tmp_path / "ca", **SMALL_CITYSCAPES)
    city_b = write_cityscapes(tmp_path / "cb", **SMALL_CITYSCAPES)
    assert _digests(city_a) == _digests(city_b)


def test_second_call_is_cached_and_conflicts_raise(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "if", **SMALL_IMAGEFOLDER)
    files = [root / "train/circle/circle_0000.jpg", root / MANIFEST]
    for path in files:  # an old timestamp that any rewrite would replace
        os.utime(path, ns=(10**18, 10**18))
    assert write_imagefolder(root, **SMALL_IMAGEFOLDER) == root
    assert [path.stat().st_mtime_ns for path in files] == [10**18, 10**18]
    with pytest.raises(ValueError, match=re.escape(str(root))):
        write_imagefolder(root, **{**SMALL_IMAGEFOLDER, "seed": 1})
    with pytest.raises(ValueError, match=re.escape(str(root))):
        write_vocdevkit(root, **SMALL_VOC)
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        write_cityscapes(stray, **SMALL_CITYSCAPES)


def test_writers_reject_unknown_classes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="hexagon"):
        write_imagefolder(tmp_path / "if", classes=("circle", "hexagon"))
    with pytest.raises(ValueError, match="unicorn"):
        write_vocdevkit(tmp_path / "voc", classes=("car", "unicorn"))


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ensure_demo_data(tmp_path_factory.mktemp("demo"))


def test_ensure_demo_data_writes_all_three(demo_data: dict[str, Path]) -> None:
    root = demo_data["voc"].parent
    assert demo_data == {
        "imagefolder": root / "imagefolder",
        "voc": root / "VOCdevkit",
        "cityscapes": root / "cityscapes",
    }
    assert all((path / MANIFEST).is_file() for path in demo_data.values())
    assert ensure_demo_data(root) == demo_data


def _members(dataset: object) -> set[str]:
    """The image files (or VOC ids) a dataset reads."""
    if hasattr(dataset, "annotations"):
        return {annotation.image_id for annotation in dataset.annotations}
    return {str(sample[0]) for sample in dataset.samples}


@pytest.mark.parametrize(
    ("config", "data"), [("classification", "imagefolder"), ("detection", "voc"), ("segmentation", "cityscapes")]
)
def test_demo_configs_validate_on_val_and_test_on_the_held_out_test_split(
    demo_data: dict[str, Path], config: str, data: str
) -> None:
    # The demo picks best.ckpt on the val split; the test split must be disjoint from val and train.
    spec = yaml.safe_load((REPO / "configs" / "demo" / f"{config}.yaml").read_text())["data"]
    module_path, _, class_name = spec["class_path"].rpartition(".")
    root = demo_data[data]
    module = getattr(importlib.import_module(module_path), class_name)(**{**spec["init_args"], "root": str(root)})
    module.setup("fit")
    module.setup("test")
    train, val, test = (_members(d) for d in (module.train_set, module.val_set, module.test_set))
    assert train and val and test
    assert not train & val and not train & test and not val & test
    # Each set is exactly the split of the real format that holds it.
    if data == "voc":
        main = root / "VOC2007" / "ImageSets" / "Main"
        for members, split in ((train, "train"), (val, "val"), (test, "test")):
            assert members == {f"2007/{i}" for i in (main / f"{split}.txt").read_text().split()}
    else:
        for members, split in ((train, "train"), (val, "val"), (test, "test")):
            split_part = 0 if data == "imagefolder" else 1  # <split>/<class>/... or leftImg8bit/<split>/...
            assert {Path(m).relative_to(root).parts[split_part] for m in members} == {split}
