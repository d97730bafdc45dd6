"""Bad annotations, image lists and label files, for real on disk, and passes with nothing left.

Each fault is written as a user makes it: a ``nan`` box coordinate, an ImageSets file saved
with a byte-order mark or as UTF-16, several annotation / image / label files missing, a
colour PNG copied over a label file, images outside the city folders, a val set without
objects, and a split whose every image is bad under ``on_bad_sample: skip``.
"""

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import Dataset

from refvision.app.demo.data import write_cityscapes, write_imagefolder, write_vocdevkit
from refvision.data import CityscapesSegmentation, ImageFolderDataModule, VOCDataModule, VOCDetection
from refvision.data.loader import make_loader


@pytest.fixture(scope="module")
def voc_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_vocdevkit(tmp_path_factory.mktemp("voc") / "VOCdevkit", num_train=4, num_test=2, size=(48, 64))


@pytest.fixture()
def devkit(voc_source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(voc_source, tmp_path / "VOCdevkit"))


@pytest.fixture(scope="module")
def cityscapes_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cityscapes(tmp_path_factory.mktemp("cityscapes"), num_train=4, num_val=1, size=(16, 32))


@pytest.fixture()
def cityscapes(cityscapes_source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(cityscapes_source, tmp_path / "cityscapes"))


def _main(devkit: Path) -> Path:
    return devkit / "VOC2007" / "ImageSets" / "Main"


def _ids(devkit: Path, split: str = "trainval") -> list[str]:
    return (_main(devkit) / f"{split}.txt").read_text().split()


def _xml(devkit: Path, image_id: str) -> Path:
    return devkit / "VOC2007" / "Annotations" / f"{image_id}.xml"


def _jpeg(devkit: Path, image_id: str) -> Path:
    return devkit / "VOC2007" / "JPEGImages" / f"{image_id}.jpg"


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "refvision" and r.levelno == logging.WARNING]


@pytest.mark.parametrize("value", ["nan", "NaN", "-inf"])
def test_voc_non_finite_box_coordinate_names_file_object_and_field(
    devkit: Path, value: str, caplog: pytest.LogCaptureFixture
) -> None:
    image_id = _ids(devkit)[1]
    xml = _xml(devkit, image_id)
    xml.write_text(re.sub(r"<ymax>\d+</ymax>", f"<ymax>{value}</ymax>", xml.read_text(), count=1))
    with pytest.raises(ValueError, match=re.escape(f"{xml} object 0 (")) as error:
        VOCDetection(str(devkit), ["2007-trainval"])
    assert f"<ymax> must be a finite number, got {value!r}" in str(error.value)
    with caplog.at_level(logging.WARNING, logger="refvision"):
        dataset = VOCDetection(str(devkit), ["2007-trainval"], on_bad_sample="skip")
    assert [path for path, _ in dataset.skipped] == [str(xml)]
    assert f"2007/{image_id}" not in [ann.image_id for ann in dataset.annotations]
    assert any(str(xml) in message for message in _warnings(caplog))


def test_voc_image_set_with_byte_order_mark_is_read(devkit: Path) -> None:
    list_file = _main(devkit) / "trainval.txt"
    expected = [ann.image_id for ann in VOCDetection(str(devkit), ["2007-trainval"]).annotations]
    list_file.write_bytes(b"\xef\xbb\xbf" + list_file.read_bytes())
    assert [ann.image_id for ann in VOCDetection(str(devkit), ["2007-trainval"]).annotations] == expected


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "latin-1"])
def test_voc_image_set_not_utf8_names_the_file(devkit: Path, encoding: str) -> None:
    list_file = _main(devkit) / "trainval.txt"
    ids = _ids(devkit)
    text = "\n".join(ids) + "\n" + ("caf\u00e9\n" if encoding == "latin-1" else "")
    list_file.write_bytes(text.encode(encoding))
    with pytest.raises(ValueError, match=re.escape(f"image set file {list_file} (2007-trainval)")) as error:
        VOCDetection(str(devkit), ["2007-trainval"], on_bad_sample="skip")
    assert "UTF-8" in str(error.value)


def test_voc_missing_files_are_all_listed_or_all_skipped(devkit: Path, caplog: pytest.LogCaptureFixture) -> None:
    ids = _ids(devkit)
    missing = [_xml(devkit, ids[0]), _xml(devkit, ids[2]), _jpeg(devkit, ids[3])]
    for path in missing:
        path.unlink()
    with pytest.raises(FileNotFoundError, match="3 missing file") as error:
        VOCDetection(str(devkit), ["2007-trainval"])
    for path in missing:
        assert f"{path}, listed in {_main(devkit) / 'trainval.txt'}, does not exist" in str(error.value)
    with caplog.at_level(logging.WARNING, logger="refvision"):
        dataset = VOCDetection(str(devkit), ["2007-trainval"], on_bad_sample="skip")
    assert len(dataset) == len(ids) - 3
    assert [path for path, _ in dataset.skipped] == [str(_xml(devkit, ids[i])) for i in (0, 2, 3)]
    warnings = _warnings(caplog)
    assert len(warnings) == 3 and all(str(path) in message for path, message in zip(missing, warnings))


def test_voc_bad_and_missing_files_are_listed_together(devkit: Path) -> None:
    ids = _ids(devkit)
    _jpeg(devkit, ids[0]).unlink()
    _xml(devkit, ids[1]).write_text("<annotation>")
    with pytest.raises(ValueError, match="2 bad file") as error:
        VOCDetection(str(devkit), ["2007-trainval"])
    assert str(_jpeg(devkit, ids[0])) in str(error.value) and f"{_xml(devkit, ids[1])}: malformed XML" in str(
        error.value
    )


def _strip_objects(devkit: Path, split: str) -> None:
    for image_id in _ids(devkit, split):
        xml = _xml(devkit, image_id)
        xml.write_text(re.sub(r"<object>.*?</object>", "", xml.read_text(), flags=re.S))


def _voc(devkit: Path) -> VOCDataModule:
    return VOCDataModule(
        str(devkit), train_sets=["2007-trainval"], batch_size=2, num_workers=0, pin_memory=False, preset="ssdlite"
    )


def test_voc_evaluation_set_without_objects_is_an_error_naming_it(devkit: Path) -> None:
    _strip_objects(devkit, "test")
    assert VOCDetection(str(devkit), ["2007-test"]).annotations[0].labels.numel() == 0
    dm = _voc(devkit)
    with pytest.raises(ValueError, match=re.escape("val sets ['2007-test']")) as error:
        dm.setup("validate")
    assert "no ground truth" in str(error.value) and str(devkit) in str(error.value)
    with pytest.raises(ValueError, match=re.escape("test sets ['2007-test']")):
        dm.setup("test")
    dm.setup("predict")  # predicting needs no ground truth
    assert len(dm.test_set) == len(_ids(devkit, "test"))


def test_voc_evaluation_set_with_only_difficult_objects_is_an_error(devkit: Path) -> None:
    for image_id in _ids(devkit, "test"):
        xml = _xml(devkit, image_id)
        xml.write_text(xml.read_text().replace("<difficult>0</difficult>", "<difficult>1</difficult>"))
    with pytest.raises(ValueError, match="not difficult"):
        _voc(devkit).setup("validate")


def _labels(root: Path, split: str = "train") -> list[Path]:
    return sorted((root / "gtFine" / split).rglob("*_gtFine_labelIds.png"))


def test_cityscapes_missing_labels_are_all_listed_or_all_skipped(
    cityscapes: Path, caplog: pytest.LogCaptureFixture
) -> None:
    labels = _labels(cityscapes)
    missing = [labels[0], labels[2]]
    for path in missing:
        path.unlink()
    with pytest.raises(FileNotFoundError, match="2 missing file") as error:
        CityscapesSegmentation(str(cityscapes), "train")
    assert all(f"label file {path}" in str(error.value) for path in missing)
    with caplog.at_level(logging.WARNING, logger="refvision"):
        dataset = CityscapesSegmentation(str(cityscapes), "train", on_bad_sample="skip")
    assert [label for _, label in dataset.samples] == [labels[1], labels[3]]
    assert len(dataset.skipped) == 2
    warnings = _warnings(caplog)
    assert len(warnings) == 2 and all(str(path) in message for path, message in zip(missing, warnings))


@pytest.mark.parametrize(
    ("mode", "colour_type", "kind"), [("RGB", 2, "RGB"), ("RGBA", 6, "RGBA"), ("LA", 4, "grayscale + alpha")]
)
def test_cityscapes_colour_label_png_is_refused_at_setup(
    cityscapes: Path, mode: str, colour_type: int, kind: str
) -> None:
    bad = _labels(cityscapes)[1]
    color = Path(str(bad).replace("_labelIds.png", "_color.png"))
    Image.open(color).convert(mode).save(bad)
    with pytest.raises(ValueError, match=re.escape(f"{bad}: a PNG label image of colour type {colour_type} ({kind})")):
        CityscapesSegmentation(str(cityscapes), "train")
    dataset = CityscapesSegmentation(str(cityscapes), "train", on_bad_sample="skip")
    assert len(dataset) == 3 and dataset.skipped[0][1].startswith(str(bad))


def test_cityscapes_palette_label_png_is_read_as_ids(cityscapes: Path) -> None:
    label = _labels(cityscapes)[0]
    expected = CityscapesSegmentation(str(cityscapes), "train")[0][1]
    ids = Image.open(label)
    palette = Image.frombytes("P", ids.size, ids.tobytes())
    palette.putpalette([value for i in range(256) for value in (i, 255 - i, i // 2)])
    palette.save(label)
    assert Image.open(label).mode == "P"
    assert np.array_equal(CityscapesSegmentation(str(cityscapes), "train")[0][1].numpy(), expected.numpy())


def test_cityscapes_images_outside_city_folders_are_named(cityscapes: Path, caplog: pytest.LogCaptureFixture) -> None:
    split = cityscapes / "leftImg8bit" / "train"
    image = sorted(split.rglob("*_leftImg8bit.png"))[0]
    stray = split / "berlin_000000_000019_leftImg8bit.png"
    shutil.copy(image, stray)
    with caplog.at_level(logging.WARNING, logger="refvision"):
        dataset = CityscapesSegmentation(str(cityscapes), "train")
    assert len(dataset) == 4
    assert any(str(stray) in message and "ignoring 1 file" in message for message in _warnings(caplog))


@pytest.fixture()
def folders(tmp_path: Path) -> Path:
    return write_imagefolder(
        tmp_path / "tree", classes=("circle", "square"), train_per_class=2, val_per_class=2, size=24
    )


def _imagefolder(root: Path, **kwargs) -> ImageFolderDataModule:
    options = dict(image_size=16, resize_size=16, batch_size=2, num_workers=0, pin_memory=False, on_bad_sample="skip")
    return ImageFolderDataModule(str(root), **{**options, **kwargs})


@pytest.mark.parametrize("num_workers", [0, 1])
def test_pass_in_which_every_sample_was_skipped_is_an_error(folders: Path, num_workers: int) -> None:
    for path in (folders / "train").rglob("*.png"):
        path.unlink()
    images = sorted((folders / "train").rglob("*.jpg"))
    for path in images:  # JPEG headers intact: only decoding fails, inside the loader
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    dm = _imagefolder(folders, num_workers=num_workers)
    dm.setup("fit")
    assert len(dm.train_set) == 2
    with pytest.raises(ValueError, match="every sample loaded in this pass") as error:
        list(dm.train_dataloader())
    assert "2 skipped: " in str(error.value) and str(folders / "train") in str(error.value)
    assert all(f"{path}: cannot decode" in str(error.value) for path in images)
    assert len(list(dm.val_dataloader())) == 2  # the val images are fine


class _Emptied(Dataset):
    """A dataset whose every file was left out at setup, as a reader under ``skip`` leaves it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.skipped = [(str(root / f"{i}.jpg"), f"{root / f'{i}.jpg'}: the file is empty (0 bytes)") for i in range(3)]

    def __len__(self) -> int:
        return 0

    def __getitem__(self, index: int) -> None:
        raise IndexError(index)


@pytest.mark.parametrize("train", [True, False])
def test_dataset_emptied_at_setup_is_an_error(tmp_path: Path, train: bool) -> None:
    dataset = _Emptied(tmp_path / "val")
    with pytest.raises(
        ValueError, match=re.escape(f"_Emptied({tmp_path / 'val'}) has no samples: all 3 file(s)")
    ) as error:
        make_loader(dataset, batch_size=2, train=train, num_workers=0, pin_memory=False)
    assert all(path in str(error.value) for path, _ in dataset.skipped)


def test_voc_size_that_disagrees_with_the_image_is_named_at_setup(
    devkit: Path, caplog: pytest.LogCaptureFixture
) -> None:
    image_id = _ids(devkit)[1]
    xml, jpeg = _xml(devkit, image_id), _jpeg(devkit, image_id)
    with Image.open(jpeg) as image:
        width, height = image.size
    assert (width, height) != (400, 400)
    text = xml.read_text()
    size = re.search(r"<size>.*?</size>", text, flags=re.S).group(0)
    declared = re.sub(
        r"<width>\d+</width>", "<width>400</width>", re.sub(r"<height>\d+</height>", "<height>400</height>", size)
    )
    xml.write_text(text.replace(size, declared))
    for obj in re.findall(
        r"<bndbox>.*?</bndbox>", text, flags=re.S
    ):  # boxes are within 400 x 400: only the size is wrong
        assert obj in xml.read_text()
    expected = f"{jpeg} is {width} x {height} (W x H) but {xml} <size> says 400 x 400"
    with pytest.raises(ValueError, match=re.escape(expected)):
        VOCDetection(str(devkit), ["2007-trainval"])  # setup alone: no image is decoded
    with caplog.at_level(logging.WARNING, logger="refvision"):
        dataset = VOCDetection(str(devkit), ["2007-trainval"], on_bad_sample="skip")
    assert len(dataset) == len(_ids(devkit)) - 1
    assert dataset.skipped == [(str(xml), expected + "; its boxes may be on another image")]
    assert [message for message in _warnings(caplog) if expected in message]
