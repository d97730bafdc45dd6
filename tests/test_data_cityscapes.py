"""Cityscapes label table, reader and DataModule on a generated tree."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from refvision.app.demo.data import write_cityscapes
from refvision.data import CityscapesDataModule, CityscapesSegmentation
from refvision.data.cityscapes_labels import ID_TO_TRAINID, LABEL_IDS, LABELS, PALETTE, TRAIN_CLASSES

NAME = "aachen_000000_000019"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cityscapes(tmp_path_factory.mktemp("cityscapes"), num_train=4, num_val=2, num_test=0, size=(48, 96))


@pytest.fixture()
def copy(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / "copy"))


def _label_path(root: Path, kind: str = "labelIds") -> Path:
    return root / "gtFine" / "train" / "aachen" / f"{NAME}_gtFine_{kind}.png"


def test_label_table() -> None:
    assert len(LABELS) == 35 and LABEL_IDS == set(range(34))
    assert TRAIN_CLASSES[0] == "road" and TRAIN_CLASSES[10] == "sky" and TRAIN_CLASSES[18] == "bicycle"
    assert len(TRAIN_CLASSES) == len(PALETTE) == 19 and PALETTE[13] == (0, 0, 142)
    assert ID_TO_TRAINID.shape == (256,) and ID_TO_TRAINID.dtype == torch.uint8
    assert ID_TO_TRAINID[[0, 1, 7, 8, 11, 23, 24, 26, 29, 33]].tolist() == [255, 255, 0, 1, 2, 10, 11, 13, 255, 18]
    assert (ID_TO_TRAINID[34:] == 255).all()


def test_masks_are_train_ids_of_the_label_ids(root: Path) -> None:
    dataset = CityscapesSegmentation(str(root), "train")
    assert len(dataset) == 4
    to_train_id = {label.id: label.train_id for label in LABELS if label.id >= 0}
    for index, (_, label_path) in enumerate(dataset.samples):
        image, mask = dataset[index]
        label_ids = np.asarray(Image.open(label_path))
        expected = np.vectorize(to_train_id.get)(label_ids)
        assert isinstance(image, tv_tensors.Image) and image.shape == (3, 48, 96) and image.dtype == torch.uint8
        assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64
        assert np.array_equal(mask.numpy(), expected)
    assert {0, 10, 255} <= set(np.unique(expected).tolist())


def test_train_ids_file_is_preferred(copy: Path) -> None:
    Image.fromarray(np.full((48, 96), 5, np.uint8)).save(_label_path(copy, "labelTrainIds"))
    auto = CityscapesSegmentation(str(copy), "train")
    assert auto.samples[0][1] == _label_path(copy, "labelTrainIds") and (auto[0][1] == 5).all()
    assert auto.samples[1][1].name.endswith("_labelIds.png")  # others have no trainIds file
    forced = CityscapesSegmentation(str(copy), "train", label_source="labelIds")
    assert not (forced[0][1] == 5).all()
    with pytest.raises(FileNotFoundError, match="_gtFine_labelTrainIds.png"):
        CityscapesSegmentation(str(copy), "train", label_source="labelTrainIds")


def test_train_batches_are_crops(root: Path) -> None:
    dm = CityscapesDataModule(str(root), crop_size=(32, 64), batch_size=2, num_workers=0, pin_memory=False)
    assert dm.num_classes == 19 and dm.class_names == list(TRAIN_CLASSES)
    dm.setup("fit")
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 32, 64) and images.dtype == torch.float32
    assert masks.shape == (2, 32, 64) and masks.dtype == torch.int64
    assert set(masks.unique().tolist()) <= set(range(19)) | {255}
    images, masks = next(iter(dm.val_dataloader()))
    assert images.shape == (1, 3, 48, 96) and masks.shape == (1, 48, 96)


def test_crop_larger_than_image_pads_mask_with_ignore(root: Path) -> None:
    torch.manual_seed(0)
    dm = CityscapesDataModule(str(root), crop_size=(80, 160), scale_range=(0.5, 0.5), num_workers=0)
    dm.setup("fit")
    image, mask = dm.train_set[0]
    assert image.shape == (3, 80, 160) and mask.shape == (80, 160)
    scaled_area = 24 * 48
    assert (mask == 255).sum() >= 80 * 160 - scaled_area
    assert (mask != 255).sum() > 0


def test_eval_size_resizes_image_and_mask(root: Path) -> None:
    dm = CityscapesDataModule(str(root), eval_size=(24, 40), num_workers=0)
    dm.setup("validate")
    image, mask = dm.val_set[0]
    assert image.shape == (3, 24, 40) and mask.shape == (24, 40)
    assert set(mask.unique().tolist()) <= set(range(19)) | {255}  # nearest: no blended ids


def test_missing_label_file(copy: Path) -> None:
    _label_path(copy).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(_label_path(copy)))):
        CityscapesSegmentation(str(copy), "train")


def test_size_mismatch(copy: Path) -> None:
    Image.fromarray(np.full((40, 96), 7, np.uint8)).save(_label_path(copy))
    with pytest.raises(ValueError, match=re.escape(str(_label_path(copy)))):
        CityscapesSegmentation(str(copy), "train")[0]


@pytest.mark.parametrize(("kind", "value"), [("labelIds", 40), ("labelTrainIds", 19)])
def test_invalid_label_values(copy: Path, kind: str, value: int) -> None:
    label = np.full((48, 96), 7 if kind == "labelIds" else 0, np.uint8)
    label[0, :3] = value
    Image.fromarray(label).save(_label_path(copy, kind))
    with pytest.raises(ValueError, match=rf"{re.escape(str(_label_path(copy, kind)))}: values \[{value}\]"):
        CityscapesSegmentation(str(copy), "train")[0]


def test_empty_or_missing_split(copy: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(copy / "leftImg8bit" / "test"))):
        CityscapesSegmentation(str(copy), "test")
    (copy / "leftImg8bit" / "test" / "berlin").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=re.escape(str(copy / "leftImg8bit" / "test" / "*/*_leftImg8bit.png"))):
        CityscapesSegmentation(str(copy), "test")
    with pytest.raises(FileNotFoundError, match="expected layout"):
        CityscapesDataModule(str(copy / "nowhere"))
