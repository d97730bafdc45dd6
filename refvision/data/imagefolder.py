"""Classification data from an image-folder tree: ``root/{train,val[,test]}/<class>/<image>``."""

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torchvision import tv_tensors
from torchvision.datasets import ImageFolder

from refvision.data import presets
from refvision.data.bad_samples import BadSample, OnBadSample, check_files, check_policy, describe
from refvision.data.decode import READABLE_SUFFIXES, UNREADABLE_IMAGE_SUFFIXES, BadImageError, decode, read_header
from refvision.data.description import IMAGENET_MEAN, IMAGENET_STD, DataDescription, Statistics
from refvision.data.loader import SplitDataModule, check_counts

logger = logging.getLogger("refvision")

LAYOUT = "root/train/<class>/<image>, root/val/<class>/<image>, optional root/test/<class>/<image>"


def decode_rgb(path: str) -> tv_tensors.Image:
    """``ImageFolder`` loader: ``Image (3, H, W)`` RGB, ``uint8`` (``uint16`` for 16-bit files).

    The image as it is displayed, EXIF orientation applied (as ``refvision predict`` reads it);
    errors name the file.
    """
    return tv_tensors.Image(decode(path, exif_orientation=True))


def _check_image(path: str) -> None:
    if path.lower().endswith(UNREADABLE_IMAGE_SUFFIXES):
        raise BadImageError(
            f"{path}: {Path(path).suffix} images are not read (readable: {', '.join(READABLE_SUFFIXES)}); convert it"
        )
    read_header(path)


def _walk(top: str) -> Iterator[tuple[str, list[str]]]:
    """``(folder, file names)`` of ``os.walk(top, followlinks=True)``, refusing symbolic-link loops.

    A folder reached again inside itself (a link to ``..``, ``.`` or the dataset root) would
    repeat its images at every level until the path grows too long: a ``ValueError`` names
    the path and the folder it leads back to.
    """

    def key(folder: str) -> tuple[int, int]:
        status = os.stat(folder)
        return status.st_dev, status.st_ino

    real = Path(os.path.realpath(top))
    inside = {top: {key(str(folder)) for folder in (real, *real.parents)}}
    for folder, subfolders, names in os.walk(top, followlinks=True):
        above = inside.pop(folder)
        for name in subfolders:
            path = os.path.join(folder, name)
            identity = key(path)
            if identity in above:
                raise ValueError(
                    f"symbolic-link loop: {path} leads to {os.path.realpath(path)}, a folder it is inside, so its "
                    f"images would be read again at every level; remove the link (expected layout {LAYOUT})"
                )
            inside[path] = above | {identity}
        yield folder, names


class CheckedImageFolder(ImageFolder):
    """torchvision's ``ImageFolder`` over every image file, checked when it is built.

    Files with a suffix in ``READABLE_SUFFIXES`` are samples (JPEG, PNG, WebP, GIF, BMP,
    TIFF, PPM: see :mod:`refvision.data.decode`). Their first bytes are read at construction:
    missing, empty and non-image files, and files with a suffix in
    ``UNREADABLE_IMAGE_SUFFIXES`` (HEIC, AVIF, ...), are bad samples — one error naming them
    under ``on_bad_sample="raise"``, logged and left out under ``"skip"`` (listed in
    :attr:`skipped`). Other files (``.txt``, ``.DS_Store``, ...), and files directly in
    ``root`` outside the class folders, are logged by name and not used. A class folder
    without image files, or (under ``"skip"``) whose image files are all bad, is an error
    naming the folder, as is a symbolic-link loop. Images are decoded by :func:`decode_rgb`;
    under ``"skip"``, ``__getitem__`` returns a :class:`BadSample` for a file that fails to
    decode (truncated).
    """

    def __init__(self, root: str, transform: Any = None, on_bad_sample: OnBadSample = "raise") -> None:
        check_policy(on_bad_sample)
        self.on_bad_sample = on_bad_sample
        self.skipped: list[tuple[str, str]] = []
        super().__init__(root, transform, loader=decode_rgb)

    def make_dataset(  # type: ignore[override]
        self, directory: str, class_to_idx: dict[str, int], *args: Any, **kwargs: Any
    ) -> list[tuple[str, int]]:
        candidates: list[tuple[str, int]] = []
        ignored: list[tuple[str, str]] = []
        for class_name, class_index in sorted(class_to_idx.items(), key=lambda item: item[1]):
            class_dir = os.path.join(directory, class_name)
            found = 0
            for folder, names in sorted(_walk(class_dir)):
                for name in sorted(names):
                    path = os.path.join(folder, name)
                    if name.lower().endswith(READABLE_SUFFIXES + UNREADABLE_IMAGE_SUFFIXES):
                        candidates.append((path, class_index))
                        found += 1
                    else:
                        ignored.append((path, ""))
            if not found:
                raise FileNotFoundError(
                    f"class folder {class_dir} holds no image files ({', '.join(READABLE_SUFFIXES)}); "
                    f"remove the folder or add images (expected layout {LAYOUT})"
                )
        if ignored:
            logger.warning("ignoring %d file(s) that are not images: %s", len(ignored), describe(ignored))
        outside = sorted((entry.path, "") for entry in os.scandir(directory) if not entry.is_dir())
        if outside:
            logger.warning(
                "ignoring %d file(s) outside the class folders of %s (expected layout %s): %s",
                len(outside),
                directory,
                LAYOUT,
                describe(outside),
            )
        samples, self.skipped = check_files(
            candidates, lambda item: _check_image(item[0]), self.on_bad_sample, directory
        )
        kept = {class_index for _, class_index in samples}
        for class_name, class_index in sorted(class_to_idx.items(), key=lambda item: item[1]):
            if class_index not in kept:
                class_dir = os.path.join(directory, class_name)
                raise ValueError(
                    f"class folder {class_dir}: every image file is bad, so the class has no samples "
                    f"(on_bad_sample: skip left them all out); fix or remove them"
                )
        return samples

    def __getitem__(self, index: int) -> Any:
        """``(transform(image), class index)``, or a :class:`BadSample` under ``"skip"``."""
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except (BadImageError, FileNotFoundError) as error:
            if self.on_bad_sample == "raise":
                raise
            return BadSample(path, str(error))
        if self.transform is not None:
            image = self.transform(image)
        return image, target


def _class_names(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise FileNotFoundError(f"image-folder split {split_dir} does not exist; expected layout {LAYOUT}")
    names = sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir())
    if not names:
        raise FileNotFoundError(f"{split_dir} has no class folders; expected layout {LAYOUT}")
    return names


class ImageFolderDataModule(SplitDataModule):
    """Train / val / test image folders with torchvision's classification reference presets.

    Batches are ``(images (B, 3, image_size, image_size) float32 RGB in [0, 1], labels (B,) int64)``.
    Class folders are sorted by name (``ImageFolder`` order) and must be identical in every split;
    they are ``class_names`` (``num_classes`` of them). ``mean`` / ``std`` are the statistics the
    model normalises these images with (default ImageNet's, what pretrained weights expect);
    the command carries all four to the model.
    ``test`` and ``predict`` use ``root/test`` when it exists, else ``root/val``.
    Every image file is checked at ``setup`` and decode failures are handled while loading,
    both by ``on_bad_sample`` (see :class:`CheckedImageFolder`).
    """

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        resize_size: int = 256,
        batch_size: int = 32,
        num_workers: int = 4,
        pin_memory: bool = True,
        interpolation: str = "bilinear",
        auto_augment: str | None = None,
        random_erase: float = 0.0,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        on_bad_sample: OnBadSample = "raise",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_policy(on_bad_sample)
        check_counts(batch_size=batch_size, image_size=image_size, resize_size=resize_size)
        check_counts(0, num_workers=num_workers)
        self.on_bad_sample = on_bad_sample
        self.root = Path(root)
        self.test_split = "test" if (self.root / "test").is_dir() else "val"
        class_names = _class_names(self.root / "train")
        for split in dict.fromkeys(("val", self.test_split)):
            names = _class_names(self.root / split)
            if names != class_names:
                raise ValueError(
                    f"class folders differ: {self.root / 'train'} has {class_names}, {self.root / split} has {names}"
                )
        self.description = DataDescription(class_names=tuple(class_names), statistics=Statistics(mean, std))
        self.train_transform = presets.classification_train(
            image_size, interpolation, auto_augment, random_erase, crop_scale, self.mean
        )
        self.eval_transform = presets.classification_eval(image_size, resize_size, interpolation)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory

    def _dataset(self, split: str, train: bool) -> CheckedImageFolder:
        transform = self.train_transform if train else self.eval_transform
        return CheckedImageFolder(str(self.root / split), transform, self.on_bad_sample)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.train_set = self._dataset("train", train=True)
        if stage in ("fit", "validate"):
            self.val_set = self._dataset("val", train=False)
        if stage in ("test", "predict"):
            self.test_set = self._dataset(self.test_split, train=False)
