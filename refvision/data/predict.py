"""Unlabelled images for ``refvision predict``: every image under a folder, recursively.

Any file with an extension Pillow opens (``.jpg``, ``.png``, ``.bmp``, ``.tif``, ``.webp``,
``.gif``, ``.ppm``...) is an image; it is decoded by :func:`refvision.data.decode.decode` as image
folders are, EXIF orientation applied, to RGB (``uint16`` for 16-bit files). A sample is named by
its path relative to the folder (sub-folders kept), and the prediction writers
(``refvision.outputs.writers``) name their outputs after it.
"""

import logging
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, Literal, NamedTuple

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from refvision.data import presets
from refvision.data.cityscapes_labels import PALETTE, TRAIN_CLASSES
from refvision.data.decode import PILLOW_ERRORS, decode, describe_pillow_error
from refvision.data.description import DataDescription, DescribedDataModule
from refvision.data.loader import batch_device, make_loader
from refvision.data.voc import detection_collate
from refvision.data.voc_format import VOC_LABELS

logger = logging.getLogger("refvision")

Preset = Literal["classification", "detection", "segmentation"]
NAMED_CLASS_LISTS: dict[str, tuple[str, ...]] = {"voc": VOC_LABELS, "cityscapes": TRAIN_CLASSES}
"""Class lists that ``class_names`` may name instead of listing them."""
NAMED_PALETTES: dict[str, tuple[tuple[int, int, int], ...]] = {"cityscapes": PALETTE}
"""The colours of the named class lists that have their own."""


class Source(NamedTuple):
    """Where a sample comes from: its ``file`` and the ``name`` outputs are called after.

    ``name`` is the file's path relative to its dataset folder without the suffix, e.g.
    ``street/img_001`` for ``<root>/street/img_001.jpg``.
    """

    file: Path
    name: PurePosixPath


def image_suffixes() -> frozenset[str]:
    """File extensions (lower case, with the dot) of the formats Pillow can open.

    Pillow also registers extensions of formats it only writes (``.pdf``, ``.palm``); those
    are not images here. MPO (multi-picture JPEG) has no opener of its own: Pillow's JPEG
    plugin opens it.
    """
    Image.init()
    return frozenset(
        suffix for suffix, fmt in Image.registered_extensions().items() if fmt in Image.OPEN or fmt == "MPO"
    )


def decode_displayed(path: str | Path) -> Tensor:
    """``(3, H, W)`` RGB of any image Pillow opens, as it is displayed (EXIF orientation applied).

    ``uint8``, or ``uint16`` for a 16-bit file, exactly as the image-folder reader decodes it.
    Errors name the file: ``FileNotFoundError`` if it is missing,
    :class:`refvision.data.decode.BadImageError` (a ``ValueError``) if it cannot be decoded.
    """
    return decode(path, ImageReadMode.RGB, exif_orientation=True, other_pillow_formats=True)


def read_rgb(path: str | Path) -> Tensor:
    """:func:`decode_displayed` as ``(3, H, W) uint8`` (16-bit values scaled to 8 bits), for drawing on."""
    return F.to_dtype(decode_displayed(path), torch.uint8, scale=True)


class ImageFiles(Dataset[tuple[tv_tensors.Image, dict[str, str]]]):
    """Every image under ``root`` (recursively, sorted by relative path), without labels.

    A sample is ``(image, {"file": relative path})`` with ``image`` the ``Image (3, H, W)`` of
    :func:`decode_displayed` (``uint8``, ``uint16`` for 16-bit files) passed through ``transform``.
    Files without an image extension are counted and logged by extension, never read; an image
    file Pillow cannot identify, or one over Pillow's pixel limit, is an error naming it
    (checked when the dataset is built, from the file header).
    """

    def __init__(self, root: str | Path, transform: Callable[[Any], Any] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"predict folder {self.root} does not exist (data.root)")
        suffixes = image_suffixes()
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and not p.name.startswith("."))
        self.files = [p for p in files if p.suffix.lower() in suffixes]
        others = [p for p in files if p.suffix.lower() not in suffixes]
        if others:
            kinds = sorted({p.suffix or "(no extension)" for p in others})
            logger.info("%s: %d files are not images and are not read (%s)", self.root, len(others), ", ".join(kinds))
        if not self.files:
            raise FileNotFoundError(
                f"predict folder {self.root} holds no image files "
                "(extensions Pillow reads: .jpg, .png, .bmp, .tif, ...)"
            )
        for path in self.files:
            try:
                with Image.open(path):
                    pass
            except PILLOW_ERRORS as error:
                raise ValueError(f"cannot read image {path}: {describe_pillow_error(error)}") from error
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def source(self, index: int) -> Source:
        """The file of sample ``index`` and its relative name (no suffix)."""
        path = self.files[index]
        return Source(path, PurePosixPath(path.relative_to(self.root).with_suffix("").as_posix()))

    def __getitem__(self, index: int) -> tuple[Any, dict[str, str]]:
        path = self.files[index]
        image = tv_tensors.Image(decode_displayed(path))
        if self.transform is not None:
            image = self.transform(image)
        return image, {"file": path.relative_to(self.root).as_posix()}


def _collate_stacked(batch: Sequence[tuple[Tensor, dict[str, str]]]) -> tuple[Tensor, list[dict[str, str]]]:
    return torch.stack([image.as_subclass(Tensor) for image, _ in batch]), [info for _, info in batch]


class PredictImagesDataModule(DescribedDataModule):
    """``predict`` on a plain folder of images, for every refvision task.

    ``preset`` applies the evaluation preprocessing of that task (use the values the model was
    trained with); images are ``float32`` RGB in [0, 1], which the model normalises itself:

    - ``classification``: resize the shorter side to ``resize_size``, center-crop ``image_size``
      (``None``: 224); batches ``(images (B, 3, S, S), infos)``;
    - ``detection``: at the image's own size (the detector resizes to ``image_size``, carried to
      ``model.image_size`` as from the training data module); batches ``(list of (3, H_i, W_i), infos)``;
    - ``segmentation``: at the image's own size, any size (the task's whole / slide / flip /
      multi-scale inference handles it); batches ``(list of (3, H_i, W_i), infos)``.

    ``infos[i]`` is ``{"file": path relative to root}``.

    The images alone do not say what the classes are: the checkpoint predicted with does (its
    ``class_names``, ``mean`` / ``std``, palette), and this module leaves them to it. Its
    ``description`` states no statistics, and class names (and for ``cityscapes`` the
    ``palette``) only when ``class_names`` is given (``voc``, ``cityscapes`` or a list;
    background first for detection): the command carries only what a description states to the
    model, and refuses names that differ from the checkpoint's.
    """

    def __init__(
        self,
        root: str,
        preset: Preset,
        image_size: int | None = None,
        resize_size: int = 256,
        interpolation: str = "bilinear",
        class_names: list[str] | str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        # Sizes only mean something to classification; logging them otherwise would clash with
        # a model's own ``image_size`` in Lightning's hparams merge, as a class-list name would
        # with the model's ``class_names``.
        resizing = ("image_size", "resize_size", "interpolation")
        self.save_hyperparameters(ignore=["class_names", *([] if preset == "classification" else resizing)])
        if preset not in ("classification", "detection", "segmentation"):
            raise ValueError(f"data.preset={preset!r}; allowed: classification, detection, segmentation")
        palette = None
        if isinstance(class_names, str):
            if class_names not in NAMED_CLASS_LISTS:
                raise ValueError(
                    f"data.class_names={class_names!r}; expected a list or one of {sorted(NAMED_CLASS_LISTS)}"
                )
            if preset == "segmentation":
                palette = NAMED_PALETTES.get(class_names)
            class_names = NAMED_CLASS_LISTS[class_names]
        self.description = DataDescription(
            class_names=tuple(class_names) if class_names is not None else None, palette=palette
        )
        self.root, self.preset = root, preset
        if preset == "classification":
            self.transform: v2.Transform = presets.classification_eval(image_size or 224, resize_size, interpolation)
        elif preset == "detection":
            self.transform = presets.detection_eval()
        else:
            self.transform = presets.segmentation_eval()
        self.collate_fn = _collate_stacked if preset == "classification" else detection_collate
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory

    def setup(self, stage: str) -> None:
        self.predict_set = ImageFiles(self.root, self.transform)

    def predict_dataloader(self) -> DataLoader:
        return make_loader(
            self.predict_set,
            self.batch_size,
            False,
            self.num_workers,
            self.pin_memory,
            self.collate_fn,
            batch_device(self),
        )
