"""VOC reader, presets, collate and DataModule on a generated VOCdevkit."""

import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import tv_tensors
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD

from refvision.app.demo.data import write_vocdevkit
from refvision.data import VOCDataModule, VOCDetection, detection_collate
from refvision.data.presets import detection_train
from refvision.data.voc_format import VOC_CLASSES, voc_to_xyxy

_OBJECT = re.compile(
    r"<name>(\w+)</name>.*?<truncated>(\d)</truncated>\s*<difficult>(\d)</difficult>\s*<bndbox>\s*"
    r"<xmin>(\d+)</xmin>\s*<ymin>(\d+)</ymin>\s*<xmax>(\d+)</xmax>\s*<ymax>(\d+)</ymax>",
    re.S,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_vocdevkit(
        tmp_path_factory.mktemp("voc") / "VOCdevkit",
        years=("2007", "2012"),
        num_train=6,
        num_val=6,
        num_test=4,
        size=(80, 96),
    )


@pytest.fixture()
def devkit(root: Path, tmp_path: Path) -> Path:
    """A writable copy of VOC2007 only."""
    shutil.copytree(root / "VOC2007", tmp_path / "VOCdevkit" / "VOC2007")
    return tmp_path / "VOCdevkit"


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _xml(devkit: Path, image_id: str = "000001") -> Path:
    return devkit / "VOC2007" / "Annotations" / f"{image_id}.xml"


def test_image_set_sizes_and_composition(root: Path) -> None:
    assert len(VOCDetection(str(root), ["2007-train"])) == 6
    assert len(VOCDetection(str(root), ["2007-test"])) == 4
    both = VOCDetection(str(root), ["2007-trainval", "2012-trainval"])
    assert len(both) == 24
    assert both.annotations[0].image_id == "2007/000001" and both.annotations[-1].image_id == "2012/2012_000012"


def test_targets_match_the_xml(root: Path) -> None:
    dataset = VOCDetection(str(root), ["2007-trainval", "2007-test"])
    seen_difficult = seen_truncated = False
    for index in range(len(dataset)):
        image, target = dataset[index]
        ann = dataset.annotations[index]
        objects = _OBJECT.findall(ann.annotation_path.read_text())
        raw = torch.tensor([[float(v) for v in obj[3:]] for obj in objects])
        assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
        assert isinstance(target["boxes"], tv_tensors.BoundingBoxes)
        assert target["boxes"].canvas_size == tuple(image.shape[-2:]) == tuple(target["orig_size"].tolist())
        torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor), voc_to_xyxy(raw))
        assert target["labels"].tolist() == [VOC_CLASSES.index(obj[0]) + 1 for obj in objects]
        assert target["difficult"].tolist() == [obj[2] == "1" for obj in objects]
        assert target["truncated"].tolist() == [obj[1] == "1" for obj in objects]
        seen_difficult |= bool(target["difficult"].any())
        seen_truncated |= bool(target["truncated"].any())
    assert seen_difficult and seen_truncated


def test_ssd_preset_keeps_per_box_fields_aligned() -> None:
    torch.manual_seed(0)
    transform = detection_train("ssd")
    boxes = torch.tensor([[5, 5, 40, 30], [50, 10, 95, 70], [20, 50, 45, 95], [60, 75, 70, 85]], dtype=torch.float32)
    labels = torch.tensor([1, 2, 3, 4])
    removed = 0
    for _ in range(30):
        image = tv_tensors.Image(torch.randint(0, 256, (3, 100, 100), dtype=torch.uint8))
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes.clone(), format="XYXY", canvas_size=(100, 100)),
            "labels": labels.clone(),
            "difficult": labels % 2 == 0,
            "truncated": labels == 3,
            "image_id": "2007/x",
        }
        image, out = transform(image, target)
        height, width = image.shape[-2:]
        assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
        box = out["boxes"]
        assert box.canvas_size == (height, width)
        assert (box[:, :2] >= 0).all() and (box[:, 2] <= width).all() and (box[:, 3] <= height).all()
        assert (box[:, 2] > box[:, 0]).all() and (box[:, 3] > box[:, 1]).all()
        assert len(out["labels"]) == len(box) == len(out["difficult"]) == len(out["truncated"])
        assert torch.equal(out["difficult"], out["labels"] % 2 == 0)
        assert torch.equal(out["truncated"], out["labels"] == 3)
        removed += 4 - len(box)
    assert removed > 0  # the crop did drop boxes, so the alignment above was exercised


def test_collate_and_ssd_accepts_an_empty_target(root: Path) -> None:
    dataset = VOCDetection(str(root), ["2007-train"], detection_train("ssdlite"))
    images, targets = detection_collate([dataset[0], dataset[1]])
    assert all(type(image) is torch.Tensor and image.dtype == torch.float32 for image in images)
    assert all(type(target["boxes"]) is torch.Tensor for target in targets)
    assert set(targets[0]) == {"boxes", "labels", "difficult", "truncated", "image_id", "orig_size"}
    targets[1] = {**targets[1], "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}

    class Backbone(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = nn.Conv2d(3, 8, 3, 4, 1), nn.Conv2d(8, 8, 3, 2, 1)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            x = self.first(x)
            return {"0": x, "1": self.second(x)}

    model = SSD(Backbone(), DefaultBoxGenerator([[2], [2]]), (64, 64), num_classes=21).train()
    losses = model(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()


def test_datamodule(root: Path) -> None:
    dm = VOCDataModule(str(root), batch_size=4, num_workers=0, pin_memory=False, preset="ssd")
    assert dm.num_classes == 21 and dm.class_names[0] == "__background__" and dm.class_names[1:] == list(VOC_CLASSES)
    dm.setup("fit")
    assert len(dm.train_set) == 24 and len(dm.val_set) == 4
    images, targets = next(iter(dm.train_dataloader()))
    assert len(images) == len(targets) == 4
    images, targets = next(iter(dm.val_dataloader()))
    assert [tuple(image.shape[-2:]) for image in images] == [tuple(t["orig_size"].tolist()) for t in targets]
    dm.setup("predict")
    assert len(dm.predict_dataloader().dataset) == 4


def test_datamodule_checks_paths_and_specs(root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        VOCDataModule(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="YEAR-SPLIT"):
        VOCDataModule(str(root), train_sets=["trainval"])


def test_one_pixel_box_is_valid(devkit: Path) -> None:
    text = _xml(devkit).read_text()
    xmin = re.search(r"<xmin>(\d+)</xmin>", text).group(1)
    _edit(_xml(devkit), re.search(r"<xmax>\d+</xmax>", text).group(0), f"<xmax>{xmin}</xmax>")
    boxes = VOCDetection(str(devkit), ["2007-trainval"]).annotations[0].boxes
    assert boxes[0, 2] - boxes[0, 0] == 1


def _malformed(devkit: Path) -> None:
    _xml(devkit).write_text("<annotation><size><width>10</width>")


def _inverted(devkit: Path) -> None:
    text = _xml(devkit).read_text()
    xmin = int(re.search(r"<xmin>(\d+)</xmin>", text).group(1))
    _edit(_xml(devkit), re.search(r"<xmax>\d+</xmax>", text).group(0), f"<xmax>{xmin - 1}</xmax>")


def _outside(devkit: Path) -> None:
    text = _xml(devkit).read_text()
    width = int(re.search(r"<width>(\d+)</width>", text).group(1))
    _edit(_xml(devkit), re.search(r"<xmax>\d+</xmax>", text).group(0), f"<xmax>{width + 1}</xmax>")


def _non_numeric(devkit: Path) -> None:
    _edit(_xml(devkit), "<ymin>", "<ymin>abc")


def _no_bndbox(devkit: Path) -> None:
    text = _xml(devkit).read_text()
    _xml(devkit).write_text(re.sub(r"<bndbox>.*?</bndbox>", "", text, count=1, flags=re.S))


def _unknown_class(devkit: Path) -> None:
    _edit(_xml(devkit), re.search(r"<name>\w+</name>", _xml(devkit).read_text()).group(0), "<name>unicorn</name>")


def _missing_jpeg(devkit: Path) -> None:
    (devkit / "VOC2007" / "JPEGImages" / "000001.jpg").unlink()


@pytest.mark.parametrize(
    ("corrupt", "error", "message", "culprit"),
    [
        (_malformed, ValueError, "malformed XML", "Annotations/000001.xml"),
        (_inverted, ValueError, "xmin <= xmax", "Annotations/000001.xml"),
        (_outside, ValueError, "<= width", "Annotations/000001.xml"),
        (_non_numeric, ValueError, "not a number", "Annotations/000001.xml"),
        (_no_bndbox, ValueError, "missing <bndbox>", "Annotations/000001.xml"),
        (_unknown_class, ValueError, "unknown class 'unicorn'.*aeroplane", "Annotations/000001.xml"),
        (_missing_jpeg, FileNotFoundError, "does not exist", "JPEGImages/000001.jpg"),
    ],
)
def test_bad_annotations_fail_at_construction(devkit: Path, corrupt, error, message, culprit) -> None:
    corrupt(devkit)
    with pytest.raises(error, match=message) as raised:
        VOCDetection(str(devkit), ["2007-trainval"])
    assert str(devkit / "VOC2007" / culprit) in str(raised.value)


def test_bad_image_headers_and_sizes_fail_at_setup(devkit: Path) -> None:
    jpeg = devkit / "VOC2007" / "JPEGImages" / "000001.jpg"
    jpeg.write_bytes(b"\xff\xd8\xff garbage")  # no frame header: its size cannot be read
    _edit(_xml(devkit, "000002"), "<width>", "<width>1")  # 1xx px wider than the JPEG
    with pytest.raises(ValueError, match="2 bad file") as error:
        VOCDetection(str(devkit), ["2007-trainval"])
    assert f"{jpeg}: JPEG ends or breaks off before its frame header" in str(error.value)
    assert re.search(r"000002\.jpg is \d+ x \d+ \(W x H\) but .*000002\.xml <size> says 1", str(error.value))


def test_image_set_file_problems(devkit: Path) -> None:
    missing = devkit / "VOC2007" / "ImageSets" / "Main" / "nosuch.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        VOCDetection(str(devkit), ["2007-nosuch"])
    empty = devkit / "VOC2007" / "ImageSets" / "Main" / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=re.escape(str(empty))):
        VOCDetection(str(devkit), ["2007-empty"])


def test_skip_policy_drops_logs_and_counts(devkit: Path, caplog: pytest.LogCaptureFixture) -> None:
    _unknown_class(devkit)
    (devkit / "VOC2007" / "JPEGImages" / "000003.jpg").unlink()
    with caplog.at_level(logging.WARNING, logger="refvision"):
        dataset = VOCDetection(str(devkit), ["2007-trainval"], on_bad_sample="skip")
    assert len(dataset) == 10
    assert [Path(path).name for path, _ in dataset.skipped] == ["000001.xml", "000003.xml"]
    assert "unicorn" in dataset.skipped[0][1] and "000003.jpg" in dataset.skipped[1][1]
    assert len([r for r in caplog.records if r.name == "refvision"]) == 2
    assert "2007/000001" not in [ann.image_id for ann in dataset.annotations]
