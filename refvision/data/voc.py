"""Pascal VOC detection: the annotation reader, the dataset, the collate and the DataModule.

Layout (``root`` is the ``VOCdevkit`` folder)::

    root/VOC<year>/Annotations/<id>.xml
    root/VOC<year>/JPEGImages/<id>.jpg
    root/VOC<year>/ImageSets/Main/<split>.txt     one image id per line

Every annotation is parsed and validated, and every image's header read (its size checked
against the XML's ``<size>``), when the dataset is built, so a bad file fails before training
starts; images are decoded per sample.
"""

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from refvision.data import presets
from refvision.data.bad_samples import BadSample, OnBadSample, check_policy, read_files
from refvision.data.decode import decode, read_header
from refvision.data.description import DataDescription, Statistics
from refvision.data.loader import SplitDataModule, check_counts
from refvision.data.voc_format import VOC_CLASSES, VOC_LABELS, voc_to_xyxy

LAYOUT = "VOCdevkit/VOC<year>/{Annotations/<id>.xml, JPEGImages/<id>.jpg, ImageSets/Main/<split>.txt}"
_IMAGE_SET = re.compile(r"(\d{4})-(\w+)")

Sample = tuple[tv_tensors.Image, dict[str, Any]]


@dataclass(frozen=True)
class VOCAnnotation:
    """One validated annotation file. Boxes are 0-based continuous ``xyxy`` (see ``voc_format``)."""

    image_id: str
    image_path: Path
    annotation_path: Path
    height: int
    width: int
    boxes: Tensor
    """``(N, 4) float32``."""
    labels: Tensor
    """``(N,) int64``, 1..20: ``VOC_CLASSES[label - 1]``."""
    difficult: Tensor
    """``(N,) bool``."""
    truncated: Tensor
    """``(N,) bool``."""


def image_set_file(root: str | Path, image_set: str) -> Path:
    """The ``ImageSets/Main`` file of an image set spec ``"YEAR-SPLIT"`` such as ``"2007-trainval"``."""
    match = _IMAGE_SET.fullmatch(image_set)
    if match is None:
        raise ValueError(f"image set {image_set!r} is not of the form 'YEAR-SPLIT', e.g. '2007-trainval'")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"VOC root {root} does not exist; expected layout {LAYOUT}")
    year, split = match.groups()
    path = root / f"VOC{year}" / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"image set file {path} ({image_set}) does not exist; expected layout {LAYOUT}")
    return path


def _text(element: ET.Element, tag: str, where: str) -> str:
    node = element.find(tag)
    if node is None or node.text is None or not node.text.strip():
        raise ValueError(f"{where}: missing <{tag}>")
    return node.text.strip()


def _number(element: ET.Element, tag: str, where: str) -> float:
    text = _text(element, tag, where)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{where}: <{tag}> is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{where}: <{tag}> must be a finite number, got {text!r}")
    return value


def _flag(element: ET.Element, tag: str, where: str) -> bool:
    """VOC's 0/1 flags; a missing tag means 0."""
    node = element.find(tag)
    if node is None or node.text is None:
        return False
    if node.text.strip() not in ("0", "1"):
        raise ValueError(f"{where}: <{tag}> must be 0 or 1, got {node.text.strip()!r}")
    return node.text.strip() == "1"


def read_annotation(annotation_path: Path, image_path: Path, image_id: str) -> VOCAnnotation:
    """Parse and validate one VOC XML file; every problem is a ``ValueError`` naming the file.

    Checked: well-formed XML, positive integer ``<size>``, known class names, finite numeric
    ``<bndbox>`` fields, and that each converted box has positive width and height and lies
    within ``[0, W] x [0, H]`` (so a VOC box with ``xmin == xmax`` is a valid 1-pixel box).
    """
    try:
        root = ET.parse(annotation_path).getroot()
    except ET.ParseError as error:
        raise ValueError(f"{annotation_path}: malformed XML ({error})") from None
    size = root.find("size")
    if size is None:
        raise ValueError(f"{annotation_path}: missing <size>")
    width, height = (_number(size, tag, f"{annotation_path} <size>") for tag in ("width", "height"))
    if width < 1 or height < 1 or not width.is_integer() or not height.is_integer():
        raise ValueError(f"{annotation_path}: <size> must be positive integers, got {width} x {height}")

    raw_boxes, labels, difficult, truncated = [], [], [], []
    for index, obj in enumerate(root.findall("object")):
        where = f"{annotation_path} object {index}"
        name = _text(obj, "name", where)
        if name not in VOC_CLASSES:
            raise ValueError(f"{where}: unknown class {name!r}; known classes: {', '.join(VOC_CLASSES)}")
        where = f"{where} ({name})"
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise ValueError(f"{where}: missing <bndbox>")
        raw_boxes.append([_number(bndbox, tag, where) for tag in ("xmin", "ymin", "xmax", "ymax")])
        labels.append(VOC_CLASSES.index(name) + 1)
        difficult.append(_flag(obj, "difficult", where))
        truncated.append(_flag(obj, "truncated", where))

    boxes = voc_to_xyxy(torch.tensor(raw_boxes, dtype=torch.float64).reshape(-1, 4))
    bad = (
        (boxes[:, 0] < 0)
        | (boxes[:, 1] < 0)
        | (boxes[:, 2] > width)
        | (boxes[:, 3] > height)
        | (boxes[:, 2] <= boxes[:, 0])
        | (boxes[:, 3] <= boxes[:, 1])
    )
    if bad.any():
        index = int(bad.nonzero()[0])
        raise ValueError(
            f"{annotation_path} object {index}: box (xmin, ymin, xmax, ymax) = {tuple(raw_boxes[index])} "
            f"must satisfy 1 <= xmin <= xmax <= width={int(width)} and 1 <= ymin <= ymax <= height={int(height)}"
        )
    return VOCAnnotation(
        image_id=image_id,
        image_path=image_path,
        annotation_path=annotation_path,
        height=int(height),
        width=int(width),
        boxes=boxes,
        labels=torch.tensor(labels, dtype=torch.int64),
        difficult=torch.tensor(difficult, dtype=torch.bool),
        truncated=torch.tensor(truncated, dtype=torch.bool),
    )


class VOCDetection(Dataset[Sample]):
    """Pascal VOC detection samples from one or more image sets (e.g. 2007 + 2012 trainval).

    A sample is ``(image, target)``: ``image`` an ``Image (3, H, W) uint8`` and ``target`` a dict
    with ``boxes`` (``BoundingBoxes`` XYXY ``(N, 4)``, 0-based continuous, ``canvas_size=(H, W)``),
    ``labels`` ``(N,) int64`` in 1..20, ``difficult`` and ``truncated`` ``(N,) bool``,
    ``image_id`` ``"<year>/<id>"`` and ``orig_size`` ``(2,) int64`` ``(H, W)``, then passed
    through ``transforms(image, target)`` when given. ``keep_difficult=False`` removes the
    objects marked difficult from the targets (training targets as MMDetection's VOC
    pipeline and ssd.pytorch build them); ``True`` keeps them, flagged (evaluation needs them).

    An id listed twice (in one ImageSets file or across the image sets) is a ``ValueError``
    naming the file(s) and the id, under both policies. ``on_bad_sample="raise"`` raises one
    error listing every bad annotation, missing file, non-image file and image whose header
    size disagrees with its XML's ``<size>`` (header checks), and raises in ``__getitem__`` on
    an image that does not decode; ``"skip"`` logs and drops the first kind (recorded as
    ``(annotation path, reason)`` in :attr:`skipped`) and returns a :class:`BadSample` for the
    second.
    """

    def __init__(
        self,
        root: str,
        image_sets: Sequence[str] = ("2007-trainval",),
        transforms: Callable[[tv_tensors.Image, dict[str, Any]], Sample] | None = None,
        on_bad_sample: OnBadSample = "raise",
        keep_difficult: bool = True,
    ) -> None:
        check_policy(on_bad_sample)
        self.on_bad_sample = on_bad_sample
        self.keep_difficult = keep_difficult
        self.transforms = transforms
        repeated = sorted({name for name in image_sets if list(image_sets).count(name) > 1})
        if repeated:
            raise ValueError(f"image sets {repeated} are given more than once in {list(image_sets)}")
        listed_in: dict[tuple[Path, str], Path] = {}
        samples: list[tuple[Path, Path, str]] = []
        for image_set in image_sets:
            list_file = image_set_file(root, image_set)
            year_dir = list_file.parents[2]
            ids = _read_ids(list_file, image_set)
            for image_id in ids:
                earlier = listed_in.setdefault((year_dir, image_id), list_file)
                if earlier != list_file:
                    raise ValueError(
                        f"image id {image_id!r} of {year_dir.name} is listed in both {earlier} and {list_file}; "
                        "each image may appear in only one of the image sets combined"
                    )
            samples += [(year_dir / "Annotations" / f"{image_id}.xml", list_file, image_id) for image_id in ids]
        self.annotations, self.skipped = read_files(
            samples,
            lambda sample: self._read(*sample),
            on_bad_sample,
            f"VOC image sets {list(image_sets)} under {root}",
        )
        if not self.annotations:
            raise ValueError(f"no valid VOC samples in {list(image_sets)} under {root}")

    @staticmethod
    def _read(annotation_path: Path, list_file: Path, image_id: str) -> VOCAnnotation:
        year_dir = annotation_path.parents[1]
        image_path = year_dir / "JPEGImages" / f"{image_id}.jpg"
        for path in (annotation_path, image_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path}, listed in {list_file}, does not exist")
        annotation = read_annotation(annotation_path, image_path, f"{year_dir.name[3:]}/{image_id}")
        header = read_header(image_path)
        if (header.width, header.height) != (annotation.width, annotation.height):
            raise ValueError(
                f"{image_path} is {header.width} x {header.height} (W x H) but {annotation_path} <size> says "
                f"{annotation.width} x {annotation.height}; its boxes may be on another image"
            )
        return annotation

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, index: int) -> Sample | BadSample:
        ann = self.annotations[index]
        try:
            image = self._image(ann)
        except (ValueError, FileNotFoundError) as error:
            if self.on_bad_sample == "raise":
                raise
            return BadSample(str(ann.image_path), str(error))
        keep = slice(None) if self.keep_difficult else ~ann.difficult
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                ann.boxes[keep].clone(), format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(ann.height, ann.width)
            ),
            "labels": ann.labels[keep].clone(),
            "difficult": ann.difficult[keep].clone(),
            "truncated": ann.truncated[keep].clone(),
            "image_id": ann.image_id,
            "orig_size": torch.tensor([ann.height, ann.width]),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    @staticmethod
    def _image(ann: VOCAnnotation) -> tv_tensors.Image:
        image = tv_tensors.Image(decode(ann.image_path))
        if tuple(image.shape[-2:]) != (ann.height, ann.width):
            raise ValueError(
                f"{ann.image_path} is {image.shape[-1]} x {image.shape[-2]} (W x H) but "
                f"{ann.annotation_path} <size> says {ann.width} x {ann.height}"
            )
        return image


def _read_ids(list_file: Path, image_set: str) -> list[str]:
    """The ids of an ImageSets file, UTF-8 text (a byte-order mark is dropped), one per line.

    A file that is not UTF-8 (UTF-16, as some Windows editors save), lists nothing or repeats
    an id is a ``ValueError`` naming it.
    """
    try:
        text = list_file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"image set file {list_file} ({image_set}) is not UTF-8 text ({error}); "
            "expected one image id per line, saved as UTF-8"
        ) from None
    if "\x00" in text:
        raise ValueError(
            f"image set file {list_file} ({image_set}) holds NUL characters (UTF-16 text?); "
            "expected one image id per line, saved as UTF-8"
        )
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"image set file {list_file} ({image_set}) lists no images")
    seen: dict[str, int] = {}
    for line_number, image_id in enumerate(ids, start=1):
        if image_id in seen:
            raise ValueError(
                f"image set file {list_file} lists id {image_id!r} twice (entries {seen[image_id]} and "
                f"{line_number}); each id may appear once"
            )
        seen[image_id] = line_number
    return ids


def detection_collate(batch: Sequence[Sample]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """Batch detection samples as torchvision detectors expect: lists, not stacked tensors.

    Returns ``(images, targets)``: ``images[i]`` a plain ``(3, H_i, W_i)`` tensor, ``targets[i]``
    the sample's dict with every ``tv_tensors`` value turned into a plain tensor.
    """
    images = [image.as_subclass(Tensor) for image, _ in batch]
    targets = [
        {key: value.as_subclass(Tensor) if isinstance(value, Tensor) else value for key, value in target.items()}
        for _, target in batch
    ]
    return images, targets


class VOCDataModule(SplitDataModule):
    """VOC detection as in the SSD paper: train on 2007+2012 trainval, evaluate on 2007 test.

    Batches come from :func:`detection_collate`. Train samples go through
    :func:`presets.detection_train` (``"ssd"`` or ``"ssdlite"``), others only become float.
    ``num_classes`` counts the background (21), as torchvision detectors do, and
    ``class_names[label]`` is the name of a label (:data:`~refvision.data.voc_format.VOC_LABELS`).
    ``predict`` uses the test sets. ``train_difficult=False`` (default) leaves objects marked
    difficult out of the training targets, as MMDetection's VOC configs and ssd.pytorch do;
    ``True`` trains on them too, as the original Caffe SSD (``train_on_diff_gt``). Val / test
    targets always keep them, flagged, so evaluation counts them as neither TP nor FP. Val and
    test sets without a single non-difficult object are an error at setup (their mAP would be
    NaN); ``predict`` takes any test set.

    ``image_size`` is the square side the detector resizes every image to (``None``: the
    detector's own, 320 for SSDLite, 300 for SSD300). The images are passed on at their own size
    in [0, 1]. ``mean`` / ``std`` are the statistics the detector normalises with (``None``: the
    detector's own). The command line carries ``image_size``, ``num_classes``, ``class_names``,
    ``mean`` and ``std`` to the model.
    """

    collate_fn = staticmethod(detection_collate)

    def __init__(
        self,
        root: str,
        train_sets: Sequence[str] = ("2007-trainval", "2012-trainval"),
        val_sets: Sequence[str] = ("2007-test",),
        test_sets: Sequence[str] = ("2007-test",),
        preset: Literal["ssd", "ssdlite"] = "ssd",
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        batch_size: int = 32,
        num_workers: int = 4,
        pin_memory: bool = True,
        on_bad_sample: OnBadSample = "raise",
        train_difficult: bool = False,
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_policy(on_bad_sample)
        check_counts(batch_size=batch_size, image_size=image_size)
        check_counts(0, num_workers=num_workers)
        self.image_size = image_size
        for image_set in (*train_sets, *val_sets, *test_sets):
            image_set_file(root, image_set)
        self.root = root
        self.image_sets = {"train": list(train_sets), "val": list(val_sets), "test": list(test_sets)}
        self.train_transform = presets.detection_train(preset)
        self.eval_transform = presets.detection_eval()
        self.description = DataDescription(VOC_LABELS, Statistics(mean, std), protocol="voc")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.on_bad_sample = on_bad_sample
        self.train_difficult = train_difficult

    def _dataset(self, split: str) -> VOCDetection:
        train = split == "train"
        transform = self.train_transform if train else self.eval_transform
        keep_difficult = self.train_difficult or not train
        return VOCDetection(self.root, self.image_sets[split], transform, self.on_bad_sample, keep_difficult)

    def _evaluation_dataset(self, split: str) -> VOCDetection:
        """The val / test dataset; one without any non-difficult object is an error (its mAP is NaN)."""
        dataset = self._dataset(split)
        if not any((~ann.difficult).any() for ann in dataset.annotations):
            raise ValueError(
                f"{split} sets {self.image_sets[split]} under {self.root}: none of their {len(dataset)} images "
                "holds an object that is not difficult, so there is no ground truth to compute mAP on; "
                f"give data.{split}_sets annotated images"
            )
        return dataset

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.train_set = self._dataset("train")
        if stage in ("fit", "validate"):
            self.val_set = self._evaluation_dataset("val")
        if stage == "test":
            self.test_set = self._evaluation_dataset("test")
        if stage == "predict":
            self.test_set = self._dataset("test")
