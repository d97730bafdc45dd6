"""ImageFolderDataModule on a generated image-folder tree."""

import re
import shutil
from pathlib import Path

import pytest
import torch

from refvision.app.demo.data import write_imagefolder
from refvision.data import ImageFolderDataModule

CLASSES = ("circle", "square", "stripes", "checker")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagefolder(
        tmp_path_factory.mktemp("imagefolder"), train_per_class=3, val_per_class=2, test_per_class=0, size=40
    )


@pytest.fixture()
def copy(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / "copy"))


def _module(root: Path, **kwargs) -> ImageFolderDataModule:
    options = dict(image_size=32, resize_size=36, batch_size=4, num_workers=0, pin_memory=False)
    return ImageFolderDataModule(str(root), **{**options, **kwargs})


def test_batches_and_classes(root: Path) -> None:
    dm = _module(root)
    assert dm.num_classes == 4 and dm.class_names == sorted(CLASSES)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 12 // 4 and loader.drop_last
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (4,) and labels.dtype == torch.int64
    assert images.min() >= 0 and images.max() <= 1 and images.max() > 0.5  # [0, 1]: the model normalises
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 32, 32)
    dm.setup("test")
    assert len(dm.test_set) == 8  # no root/test: test falls back to val
    assert [dm.class_names[label] for label in dm.test_set.targets[::2]] == sorted(CLASSES)


def test_test_split_is_used_when_present(copy: Path) -> None:
    shutil.copytree(copy / "train", copy / "test")
    dm = _module(copy)
    dm.setup("predict")
    assert len(dm.predict_dataloader().dataset) == 12


def test_auto_augment_and_random_erase(root: Path) -> None:
    dm = _module(root, auto_augment="ta_wide", random_erase=0.5)
    dm.setup("fit")
    images, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="auto_augment"):
        _module(root, auto_augment="bogus")


def test_missing_train_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "train"))):
        _module(tmp_path)


def test_class_mismatch_names_both_splits(copy: Path) -> None:
    (copy / "val" / "square").rename(copy / "val" / "triangle")
    with pytest.raises(ValueError, match="class folders differ") as error:
        _module(copy)
    assert str(copy / "train") in str(error.value) and str(copy / "val") in str(error.value)
    assert "triangle" in str(error.value)


def test_non_image_file_is_found_at_setup_and_named(copy: Path) -> None:
    bad = copy / "val" / "circle" / "circle_0000.jpg"
    bad.write_bytes(b"not a jpeg at all")
    dm = _module(copy)
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        dm.setup("validate")
