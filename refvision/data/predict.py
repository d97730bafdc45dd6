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
from refvision.data.bad_samples import BadSample, OnBadSample, check_files, check_policy, describe
from refvision.data.cityscapes_labels import PALETTE, TRAIN_CLASSES
from refvision.data.decode import BadImageError, decode, read_header
from refvision.data.description import DataDescription, DescribedDataModule
from refvision.data.loader import batch_device, check_counts, make_loader
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


class ImageFiles(Dataset[tuple[tv_tensors.Image, dict[str, Any]] | BadSample]):
    """Every image under ``root`` (recursively, sorted by relative path), without labels.

    A sample is ``(image, {"file": relative path, "index": sample index})`` with ``image`` the
    ``Image (3, H, W)`` of :func:`decode_displayed` (``uint8``, ``uint16`` for 16-bit files)
    passed through ``transform``. Files without an image extension are never read; one warning
    names them. Every image file's header is read when the dataset is built: a file Pillow
    cannot identify, or one over the pixel limit (:func:`refvision.data.decode.check_pixels`),
    is a bad sample, as is one that fails to decode when it is loaded. ``on_bad_sample="raise"``
    raises one error listing every bad header (and raises on a file that fails to decode);
    ``"skip"`` logs and leaves them out (listed in :attr:`skipped`) and returns a
    :class:`BadSample` for a file that fails to decode.
    """

    def __init__(
        self, root: str | Path, transform: Callable[[Any], Any] | None = None, on_bad_sample: OnBadSample = "raise"
    ) -> None:
        check_policy(on_bad_sample)
        self.root = Path(root)
        self.on_bad_sample = on_bad_sample
        if not self.root.is_dir():
            raise FileNotFoundError(f"predict folder {self.root} does not exist (data.root)")
        suffixes = image_suffixes()
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and not p.name.startswith("."))
        others = [(str(p), "") for p in files if p.suffix.lower() not in suffixes]
        if others:
            kinds = sorted({Path(p).suffix or "(no extension)" for p, _ in others})
            logger.warning(
                "%s: %d file(s) are not images (%s) and are not read: %s",
                self.root,
                len(others),
                ", ".join(kinds),
                describe(others),
            )
        images = [p for p in files if p.suffix.lower() in suffixes]
        if not images:
            raise FileNotFoundError(
                f"predict folder {self.root} holds no image files "
                "(extensions Pillow reads: .jpg, .png, .bmp, .tif, ...)"
            )
        self.files, self.skipped = check_files(
            images,
            lambda path: read_header(path, other_pillow_formats=True),
            on_bad_sample,
            f"predict folder {self.root}",
        )
        if not self.files:
            raise ValueError(
                f"predict folder {self.root}: every image file is bad, so there is nothing to predict "
                f"({describe(self.skipped)})"
            )
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def source(self, index: int) -> Source:
        """The file of sample ``index`` and its relative name (no suffix)."""
        path = self.files[index]
        return Source(path, PurePosixPath(path.relative_to(self.root).with_suffix("").as_posix()))

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]] | BadSample:
        path = self.files[index]
        try:
            image = tv_tensors.Image(decode_displayed(path))
        except (BadImageError, FileNotFoundError) as error:
            if self.on_bad_sample == "raise":
                raise
            return BadSample(str(path), str(error))
        if self.transform is not None:
            image = self.transform(image)
        return image, {"file": path.relative_to(self.root).as_posix(), "index": index}


def _collate_stacked(batch: Sequence[tuple[Tensor, dict[str, str]]]) -> tuple[Tensor, list[dict[str, str]]]:
    return torch.stack([image.as_subclass(Tensor) for image, _ in batch]), [info for _, info in batch]


def predict_transform(
    preset: Preset, image_size: int | None = None, resize_size: int = 256, interpolation: str = "bilinear"
) -> v2.Transform:
    """The evaluation preprocessing of ``preset`` (see :class:`PredictImagesDataModule`): a decoded
    ``Image (3, H, W)`` (``uint8`` or ``uint16``) -> ``float32`` RGB in [0, 1]. ``refvision predict``
    and ``refvision.inference.Predictor`` both preprocess with it."""
    if preset == "classification":
        return presets.classification_eval(image_size or 224, resize_size, interpolation)
    if preset == "detection":
        return presets.detection_eval()
    return presets.segmentation_eval()


def predict_collate(preset: Preset) -> Callable[[Sequence[tuple[Tensor, dict[str, Any]]]], tuple[Any, list[Any]]]:
    """How ``preset`` batches ``(image, info)`` samples: classification ``(images (B, 3, S, S), infos)``,
    the others ``(list of (3, H_i, W_i), infos)``."""
    return _collate_stacked if preset == "classification" else detection_collate


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

    ``infos[i]`` is ``{"file": path relative to root, "index": sample index}``. Bad image files
    follow ``on_bad_sample`` (see :class:`ImageFiles`).

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
        on_bad_sample: OnBadSample = "raise",
    ) -> None:
        super().__init__()
        # Sizes only mean something to classification; logging them otherwise would clash with
        # a model's own ``image_size`` in Lightning's hparams merge, as a class-list name would
        # with the model's ``class_names``.
        resizing = ("image_size", "resize_size", "interpolation")
        self.save_hyperparameters(ignore=["class_names", *([] if preset == "classification" else resizing)])
        if preset not in ("classification", "detection", "segmentation"):
            raise ValueError(f"data.preset={preset!r}; allowed: classification, detection, segmentation")
        check_policy(on_bad_sample)
        check_counts(batch_size=batch_size, image_size=image_size, resize_size=resize_size)
        check_counts(0, num_workers=num_workers)
        self.on_bad_sample = on_bad_sample
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
        self.transform = predict_transform(preset, image_size, resize_size, interpolation)
        self.collate_fn = predict_collate(preset)
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory

    def setup(self, stage: str) -> None:
        self.predict_set = ImageFiles(self.root, self.transform, self.on_bad_sample)

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
