"""Cityscapes semantic segmentation (fine annotations): the dataset and the DataModule.

Layout::

    root/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    root/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
    root/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png   (optional)

``labelIds`` hold the 34 official label ids and are mapped to the 19 train ids by
:data:`~refvision.data.cityscapes_labels.ID_TO_TRAINID`; ``labelTrainIds`` (as written by
cityscapesScripts' ``createTrainIdLabelImgs``) already hold train ids.
"""

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode

from refvision.data import presets
from refvision.data.bad_samples import BadSample, OnBadSample, check_policy, describe, read_files
from refvision.data.cityscapes_labels import ID_TO_TRAINID, IGNORE_INDEX, LABEL_IDS, PALETTE, TRAIN_CLASSES, TRAIN_IDS
from refvision.data.decode import BadImageError, decode, read_header
from refvision.data.description import IMAGENET_MEAN, IMAGENET_STD, DataDescription, Statistics
from refvision.data.loader import SplitDataModule, check_counts

logger = logging.getLogger("refvision")

LAYOUT = (
    "root/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png and "
    "root/gtFine/<split>/<city>/<name>_gtFine_labelIds.png (or _gtFine_labelTrainIds.png)"
)
IMAGE_SUFFIX = "_leftImg8bit.png"
_PNG_COLOUR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale + alpha", 6: "RGBA"}
"""PNG colour types (IHDR); labels must be grayscale or palette (whose indices are the ids)."""

LabelSource = Literal["auto", "labelIds", "labelTrainIds"]
Sample = tuple[tv_tensors.Image, tv_tensors.Mask]


class CityscapesSegmentation(Dataset[Sample]):
    """Cityscapes fine-annotation samples ``(Image (3, H, W) uint8, Mask (H, W) int64)``.

    Mask values are train ids 0..18 and 255 (ignored). ``label_source="auto"`` reads an image's
    ``labelTrainIds`` file when present, else its ``labelIds`` file. Label files are paired
    with images when the dataset is built and the headers of both are read then: missing
    labels, empty or non-image files, and label files that are not 8-bit grayscale or palette
    PNGs (a 16-bit label PNG, an RGB ``_gtFine_color.png`` copy), are found before training.
    Values, sizes and decoding are checked per sample. Each error names the file.
    ``on_bad_sample="raise"`` raises (one error listing every pair that fails at
    construction); ``"skip"`` logs and drops those pairs (listed in :attr:`skipped`) and
    returns a :class:`BadSample` for a pair that fails to load. Files under
    ``leftImg8bit/<split>`` that are not ``<city>/*_leftImg8bit.png`` are logged by name.
    """

    def __init__(
        self,
        root: str,
        split: Literal["train", "val", "test"] = "train",
        transforms: Callable[[tv_tensors.Image, tv_tensors.Mask], Sample] | None = None,
        label_source: LabelSource = "auto",
        on_bad_sample: OnBadSample = "raise",
    ) -> None:
        check_policy(on_bad_sample)
        if label_source not in ("auto", "labelIds", "labelTrainIds"):
            raise ValueError(f"label_source must be 'auto', 'labelIds' or 'labelTrainIds', got {label_source!r}")
        image_dir = Path(root) / "leftImg8bit" / split
        if not image_dir.is_dir():
            raise FileNotFoundError(f"Cityscapes image folder {image_dir} does not exist; expected layout {LAYOUT}")
        pattern = f"*/*{IMAGE_SUFFIX}"
        images = sorted(image_dir.glob(pattern))
        ignored = sorted({path for path in image_dir.rglob("*") if path.is_file()} - set(images))
        if ignored:
            logger.warning(
                "ignoring %d file(s) under %s that are not <city>/*%s: %s",
                len(ignored),
                image_dir,
                IMAGE_SUFFIX,
                describe([(str(path), "") for path in ignored]),
            )
        if not images:
            raise FileNotFoundError(f"no Cityscapes images match {image_dir / pattern}; expected layout {LAYOUT}")
        label_dir = Path(root) / "gtFine" / split
        self.root = root
        self.transforms = transforms
        self.on_bad_sample = on_bad_sample
        self.samples, self.skipped = read_files(
            images, lambda image: _pair(image, label_dir, label_source), on_bad_sample, str(Path(root) / "*" / split)
        )
        if not self.samples:
            raise ValueError(f"no valid Cityscapes samples in {image_dir}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample | BadSample:
        image_path, label_path = self.samples[index]
        try:
            image, mask = _load(image_path, label_path)
        except (ValueError, FileNotFoundError) as error:
            if self.on_bad_sample == "raise":
                raise
            return BadSample(str(image_path), str(error))
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        return image, mask


def _pair(image_path: Path, label_dir: Path, label_source: LabelSource) -> tuple[Path, Path]:
    """``(image, label file)`` once both headers are checked; errors name the file."""
    label_path = _label_file(image_path, label_dir, label_source)
    read_header(image_path)
    _check_label_header(label_path)
    return image_path, label_path


def _check_label_header(label_path: Path) -> None:
    header = read_header(label_path)
    expected = "Cityscapes labels are 8-bit single-channel PNGs (labelIds 0..33 or labelTrainIds 0..18, 255)"
    if header.format != "png" or header.bit_depth != 8:
        depth = f"{header.bit_depth}-bit " if header.bit_depth is not None else ""
        raise BadImageError(f"{label_path}: a {depth}{header.format.upper()} label image; {expected}")
    if header.colour_type not in (0, 3):
        kind = _PNG_COLOUR_TYPES.get(header.colour_type, "unknown")
        raise BadImageError(
            f"{label_path}: a PNG label image of colour type {header.colour_type} ({kind}); {expected}: grayscale "
            "or palette (its indices are the ids), not a colour image such as *_gtFine_color.png"
        )


def _load(image_path: Path, label_path: Path) -> Sample:
    """Decode and check one pair: ``(Image (3, H, W) uint8, Mask (H, W) int64 train ids)``."""
    image = tv_tensors.Image(decode(image_path))
    label = decode(label_path, ImageReadMode.UNCHANGED)
    if label.dtype != torch.uint8:
        raise BadImageError(f"{label_path}: a {label.dtype} label image; Cityscapes labels are 8-bit PNGs")
    if label.shape[0] != 1:
        raise ValueError(f"{label_path}: expected a single-channel label image, got {label.shape[0]} channels")
    label = label[0]
    if label.shape != image.shape[-2:]:
        raise ValueError(f"{label_path} is {tuple(label.shape)} (H, W) but {image_path} is {tuple(image.shape[-2:])}")
    is_train_ids = label_path.name.endswith("_labelTrainIds.png")
    valid = TRAIN_IDS if is_train_ids else LABEL_IDS
    unknown = set(label.unique().tolist()) - valid
    if unknown:
        kind = "train ids (0..18, 255)" if is_train_ids else "Cityscapes label ids (0..33)"
        raise ValueError(f"{label_path}: values {sorted(unknown)} are not {kind}")
    train_ids = label if is_train_ids else ID_TO_TRAINID[label.long()]
    return image, tv_tensors.Mask(train_ids.to(torch.int64))


def _label_file(image: Path, label_dir: Path, label_source: LabelSource) -> Path:
    stem = label_dir / image.parent.name / image.name.removesuffix(IMAGE_SUFFIX)
    label_ids, train_ids = Path(f"{stem}_gtFine_labelIds.png"), Path(f"{stem}_gtFine_labelTrainIds.png")
    if label_source == "labelTrainIds" or (label_source == "auto" and train_ids.is_file()):
        chosen = train_ids
    else:
        chosen = label_ids
    if not chosen.is_file():
        raise FileNotFoundError(f"label file {chosen} for image {image} does not exist; expected layout {LAYOUT}")
    return chosen


class CityscapesDataModule(SplitDataModule):
    """Cityscapes train / val with MMSegmentation's DeepLabV3+ augmentation.

    Train batches: ``(images (B, 3, *crop_size) float32 RGB in [0, 1], masks (B, *crop_size) int64)``
    after random scaling by ``scale_range``, crop (padding: image 0, mask 255), flip and
    photometric distortion. Val / test batches are full resolution, or ``eval_size`` (H, W) when
    given (the mask is then resized with nearest neighbour, so metrics are computed at that
    size). ``test`` and ``predict`` use ``test_split``: ``val`` by default, since Cityscapes test
    labels are not public; ``test`` for a tree whose test split holds real labels.

    The data describes itself to the model (the command carries it): the 19 train classes
    (``class_names``, ``num_classes``), their Cityscapes colours (``palette``), the mask value of
    unlabelled pixels (``ignore_index``, 255) and the ``mean`` / ``std`` the model normalises with
    (default ImageNet's).
    """

    def __init__(
        self,
        root: str,
        crop_size: tuple[int, int] = (512, 1024),
        scale_range: tuple[float, float] = (0.5, 2.0),
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        batch_size: int = 8,
        val_batch_size: int = 1,
        num_workers: int = 4,
        pin_memory: bool = True,
        label_source: LabelSource = "auto",
        eval_size: tuple[int, int] | None = None,
        on_bad_sample: OnBadSample = "raise",
        test_split: Literal["val", "test"] = "val",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_policy(on_bad_sample)
        check_counts(batch_size=batch_size, val_batch_size=val_batch_size, crop_size=crop_size, eval_size=eval_size)
        check_counts(0, num_workers=num_workers)
        if test_split not in ("val", "test"):
            raise ValueError(f"test_split must be 'val' or 'test', got {test_split!r}")
        self.on_bad_sample = on_bad_sample
        for split in dict.fromkeys(("train", "val", test_split)):
            path = Path(root) / "leftImg8bit" / split
            if not path.is_dir():
                raise FileNotFoundError(f"Cityscapes split folder {path} does not exist; expected layout {LAYOUT}")
        self.root = root
        self.test_split = test_split
        self.label_source: LabelSource = label_source
        self.train_transform = presets.segmentation_train(crop_size, scale_range)
        self.eval_transform = presets.segmentation_eval(eval_size)
        self.description = DataDescription(TRAIN_CLASSES, Statistics(mean, std), PALETTE, IGNORE_INDEX)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.train_set = CityscapesSegmentation(
                self.root, "train", self.train_transform, self.label_source, self.on_bad_sample
            )
        self.val_set = CityscapesSegmentation(
            self.root, "val", self.eval_transform, self.label_source, self.on_bad_sample
        )
        self.test_set = (
            self.val_set
            if self.test_split == "val"
            else CityscapesSegmentation(self.root, "test", self.eval_transform, self.label_source, self.on_bad_sample)
        )

    @property
    def eval_batch_size(self) -> int:
        return self.val_batch_size
