"""COCO-format detection: an annotation file (``instances.json``) and its image folder, read with pycocotools.

The annotation file is COCO's object detection format; ``file_name`` is relative to the image folder::

    {"images":      [{"id": 5, "file_name": "a.jpg", "width": 640, "height": 480}, ...],
     "annotations": [{"id": 1, "image_id": 5, "category_id": 3, "bbox": [x, y, w, h],
                      "area": 1234.5, "iscrowd": 0}, ...],
     "categories":  [{"id": 3, "name": "cat"}, ...]}

Categories become the contiguous labels ``1..K`` in ascending id order (0 is the background, as
torchvision's detectors count), named by their ``name``; :class:`CocoFile` keeps the ids so that
evaluation and results files use the file's own. ``bbox`` is COCO's ``[x, y, width, height]`` in
0-based continuous pixels, the convention of refvision's ``xyxy`` boxes, so a box becomes
``(x, y, x + w, y + h)``. ``iscrowd: 1`` marks a crowd region: never a training target, an
ignore region in evaluation (pycocotools' rules). ``area`` (pycocotools' small / medium / large
ranges read it) is ``w * h`` where an annotation has none.

Two kinds of fault, both errors naming the file and the key:

- the file as a whole (checked when it is read, always an error): a missing file, text that is
  not JSON, a missing ``images`` / ``annotations`` / ``categories`` list, an id that is not an
  integer, an image or annotation id given twice, a category declared twice (or two categories of
  one name), an annotation whose ``image_id`` or ``category_id`` the file does not declare;
- one image (checked when the dataset is built, under ``on_bad_sample``): a missing or unreadable
  image file, one whose size is not its ``width`` x ``height``, an annotation whose ``bbox`` is not
  four finite numbers, has a width or height <= 0 or lies outside the image, an ``iscrowd`` other
  than 0 / 1, an ``area`` that is not a number >= 0. ``"raise"`` gives one error listing them,
  ``"skip"`` leaves those images out (logged, in :attr:`CocoDetection.skipped`).
"""

import contextlib
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import torch
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from refvision.data import presets
from refvision.data.bad_samples import BadSample, OnBadSample, check_policy, read_files
from refvision.data.decode import decode, read_header
from refvision.data.description import DataDescription, Statistics
from refvision.data.loader import SplitDataModule, check_counts
from refvision.data.predict import Source
from refvision.data.voc import detection_collate

BACKGROUND = "__background__"
"""The name of label 0."""
SPLITS = ("train", "val", "test")

Sample = tuple[tv_tensors.Image, dict[str, Any]]


@dataclass(frozen=True)
class CocoFile:
    """One annotation file whose structure is checked (see the module docstring), indexed by pycocotools.

    ``category_ids`` are the declared ids in ascending order, label ``i`` is ``category_ids[i - 1]``
    and is called ``class_names[i]`` (``class_names[0]`` is the background).
    """

    path: Path
    coco: COCO
    category_ids: tuple[int, ...]
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class CocoImage:
    """One image of an annotation file with its annotations in file order, values checked."""

    image_id: int
    image_path: Path
    annotation_path: Path
    height: int
    width: int
    bbox: Tensor
    """``(N, 4) float64``: ``[x, y, w, h]`` as the file gives them."""
    labels: Tensor
    """``(N,) int64`` in ``1..K``."""
    iscrowd: Tensor
    """``(N,) bool``."""
    area: Tensor
    """``(N,) float64``: the file's ``area``, else ``w * h``."""
    annotation_ids: Tensor
    """``(N,) int64``."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_annotation_file(path: str | Path, key: str = "annotation file") -> CocoFile:
    """Read and check the structure of a COCO annotation file; index it with pycocotools' ``COCO``.

    ``key`` names the setting that gave the path in errors (``data.train_annotations``). Raises
    ``FileNotFoundError`` for a missing file and a one-line ``ValueError`` naming the file and
    the key or id at fault for every problem of the file as a whole (the module docstring lists
    them); per-annotation values are checked with the images (:func:`read_image`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}={path}: the file does not exist; expected a COCO annotation file (JSON)")
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error}); expected a COCO annotation file (JSON)") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); "
            "expected a COCO annotation file"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories'")
    for name in ("images", "annotations", "categories"):
        if not isinstance(data.get(name), list):
            got = "missing" if name not in data else f"a {type(data[name]).__name__}"
            raise ValueError(f"{path}: '{name}' is {got}; expected a list of objects")
        if not all(isinstance(item, dict) for item in data[name]):
            index = next(i for i, item in enumerate(data[name]) if not isinstance(item, dict))
            raise ValueError(f"{path}: {name}[{index}] is {data[name][index]!r}; expected an object")

    categories: dict[int, tuple[int, str]] = {}
    names: dict[str, int] = {}
    for index, category in enumerate(data["categories"]):
        category_id, name = category.get("id"), category.get("name")
        if not _is_int(category_id):
            raise ValueError(f"{path}: categories[{index}] 'id' is {category_id!r}; expected an integer")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{path}: categories[{index}] (id {category_id}) 'name' is {name!r}; expected a name")
        if category_id in categories:
            raise ValueError(
                f"{path}: category id {category_id} is declared twice (categories[{categories[category_id][0]}] "
                f"and categories[{index}]); expected each id once"
            )
        if name in names:
            raise ValueError(
                f"{path}: category name {name!r} is given to ids {names[name]} and {category_id}; "
                "expected distinct names (they name the classes)"
            )
        categories[category_id], names[name] = (index, name), category_id
    if not categories:
        raise ValueError(f"{path}: 'categories' is empty; expected the object categories")

    images: dict[int, int] = {}
    for index, image in enumerate(data["images"]):
        image_id = image.get("id")
        if not _is_int(image_id):
            raise ValueError(f"{path}: images[{index}] 'id' is {image_id!r}; expected an integer")
        if image_id in images:
            raise ValueError(
                f"{path}: image id {image_id} is listed twice (images[{images[image_id]}] and images[{index}]); "
                "expected each id once"
            )
        images[image_id] = index
        file_name = image.get("file_name")
        if not isinstance(file_name, str) or not file_name.strip():
            raise ValueError(f"{path}: image id {image_id} 'file_name' is {file_name!r}; expected a file name")
        for side in ("width", "height"):
            if not _is_int(image.get(side)) or image[side] < 1:
                raise ValueError(
                    f"{path}: image id {image_id} ({file_name}) '{side}' is {image.get(side)!r}; "
                    "expected a positive integer"
                )

    annotations: dict[int, int] = {}
    declared = ", ".join(str(i) for i in sorted(categories))
    for index, annotation in enumerate(data["annotations"]):
        annotation_id = annotation.get("id")
        if not _is_int(annotation_id):
            raise ValueError(f"{path}: annotations[{index}] 'id' is {annotation_id!r}; expected an integer")
        if annotation_id in annotations:
            raise ValueError(
                f"{path}: annotation id {annotation_id} is given twice (annotations[{annotations[annotation_id]}] "
                f"and annotations[{index}]); expected each id once"
            )
        annotations[annotation_id] = index
        image_id, category_id = annotation.get("image_id"), annotation.get("category_id")
        if not _is_int(image_id) or image_id not in images:
            raise ValueError(
                f"{path}: annotation id {annotation_id}: image_id {image_id!r} is not in 'images'; "
                "expected the id of a listed image"
            )
        if not _is_int(category_id) or category_id not in categories:
            raise ValueError(
                f"{path}: annotation id {annotation_id}: category_id {category_id!r} is not declared in "
                f"'categories'; expected one of {declared}"
            )

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    ids = tuple(sorted(categories))
    return CocoFile(path, coco, ids, (BACKGROUND, *(categories[i][1] for i in ids)))


def read_image(coco_file: CocoFile, image_id: int, image_dir: Path) -> CocoImage:
    """Check one image of ``coco_file`` and its annotations (see the module docstring); read its header.

    Raises ``FileNotFoundError`` for a missing image file and a one-line ``ValueError`` naming the
    annotation file, the annotation id and what was expected, or the image file, otherwise.
    """
    info = coco_file.coco.imgs[image_id]
    width, height = info["width"], info["height"]
    image_path = image_dir / info["file_name"]
    where = f"{coco_file.path}: image id {image_id} ({info['file_name']})"
    labels = {category_id: label for label, category_id in enumerate(coco_file.category_ids, start=1)}
    bbox, classes, iscrowd, area, ids = [], [], [], [], []
    for annotation in coco_file.coco.imgToAnns.get(image_id, []):
        here = f"{coco_file.path}: annotation id {annotation['id']} (image id {image_id}, {info['file_name']})"
        box = annotation.get("bbox")
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise ValueError(f"{here}: bbox is {box!r}; expected [x, y, width, height], four finite numbers")
        x, y, w, h = (float(v) for v in box)
        if w <= 0 or h <= 0:
            raise ValueError(f"{here}: bbox {box} has width {box[2]} and height {box[3]}; expected both > 0")
        if x >= width or y >= height or x + w <= 0 or y + h <= 0:
            raise ValueError(
                f"{here}: bbox {box} lies outside the {width} x {height} image; expected a box that overlaps it"
            )
        crowd = annotation.get("iscrowd", 0)
        if crowd not in (0, 1):
            raise ValueError(f"{here}: iscrowd is {crowd!r}; expected 0 or 1")
        size = annotation.get("area", w * h)
        if not _is_number(size) or size < 0:
            raise ValueError(f"{here}: area is {size!r}; expected a number >= 0")
        bbox.append([x, y, w, h])
        classes.append(labels[annotation["category_id"]])
        iscrowd.append(bool(crowd))
        area.append(float(size))
        ids.append(annotation["id"])
    if not image_path.is_file():
        raise FileNotFoundError(f"{image_path}, image id {image_id} of {coco_file.path}, does not exist")
    header = read_header(image_path)
    if (header.width, header.height) != (width, height):
        raise ValueError(
            f"{image_path} is {header.width} x {header.height} (W x H) but {where} says {width} x {height}; "
            "its boxes may be on another image"
        )
    return CocoImage(
        image_id=image_id,
        image_path=image_path,
        annotation_path=coco_file.path,
        height=height,
        width=width,
        bbox=torch.tensor(bbox, dtype=torch.float64).reshape(-1, 4),
        labels=torch.tensor(classes, dtype=torch.int64),
        iscrowd=torch.tensor(iscrowd, dtype=torch.bool),
        area=torch.tensor(area, dtype=torch.float64),
        annotation_ids=torch.tensor(ids, dtype=torch.int64),
    )


def xywh_to_xyxy(bbox: Tensor, height: int, width: int) -> Tensor:
    """COCO ``[x, y, w, h]`` ``(N, 4)`` to ``xyxy`` ``(N, 4) float32``, clipped to the ``width`` x ``height`` image."""
    xyxy = torch.cat((bbox[:, :2], bbox[:, :2] + bbox[:, 2:]), dim=1)
    limits = torch.tensor([width, height, width, height], dtype=xyxy.dtype)
    return torch.minimum(xyxy.clamp(min=0), limits).to(torch.float32)


class CocoDetection(Dataset[Sample]):
    """The images of one COCO annotation file, with their annotations.

    A sample is ``(image, target)``: ``image`` an ``Image (3, H, W) uint8``; ``target`` holds
    ``boxes`` (``BoundingBoxes`` XYXY ``(N, 4) float32``, clipped to the image), ``labels``
    ``(N,) int64`` in ``1..K``, ``image_id`` (the file's integer id) and ``orig_size`` ``(2,)``
    ``(H, W)``, then goes through ``transforms(image, target)`` when given. Training targets
    (``evaluation=False``) hold the non-crowd annotations only. Evaluation targets hold every
    annotation, in file order, with what ``COCOeval`` reads of it: ``iscrowd`` ``(N,) bool``,
    ``area`` ``(N,) float64``, ``annotation_id`` ``(N,) int64`` and ``bbox`` ``(N, 4) float64``,
    the file's ``[x, y, w, h]`` unclipped (:class:`~refvision.metrics.COCOMeanAveragePrecision`).

    Every image of the file is a sample, in the file's order, with or without annotations.
    ``on_bad_sample`` decides what happens to a bad image (see the module docstring); an image
    that does not decode raises in ``__getitem__`` (``"raise"``) or gives a :class:`BadSample`
    (``"skip"``).
    """

    def __init__(
        self,
        annotation_file: str | Path | CocoFile,
        image_dir: str | Path,
        transforms: Callable[[tv_tensors.Image, dict[str, Any]], Sample] | None = None,
        on_bad_sample: OnBadSample = "raise",
        evaluation: bool = True,
    ) -> None:
        check_policy(on_bad_sample)
        self.coco_file = (
            annotation_file if isinstance(annotation_file, CocoFile) else read_annotation_file(annotation_file)
        )
        self.root = Path(image_dir)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} of {self.coco_file.path} does not exist")
        self.transforms, self.on_bad_sample, self.evaluation = transforms, on_bad_sample, evaluation
        image_ids = [image["id"] for image in self.coco_file.coco.dataset["images"]]
        self.images, self.skipped = read_files(
            [(self.root / self.coco_file.coco.imgs[i]["file_name"], i) for i in image_ids],
            lambda item: read_image(self.coco_file, item[1], self.root),
            on_bad_sample,
            f"{self.coco_file.path} with images in {self.root}",
        )
        if not self.images:
            raise ValueError(f"no valid images in {self.coco_file.path} (images in {self.root})")

    def __len__(self) -> int:
        return len(self.images)

    def source(self, index: int) -> Source:
        """The image file of sample ``index`` and its name for outputs: its ``file_name`` without the suffix."""
        image = self.images[index]
        return Source(
            image.image_path, PurePosixPath(image.image_path.relative_to(self.root).with_suffix("").as_posix())
        )

    def __getitem__(self, index: int) -> Sample | BadSample:
        image = self.images[index]
        try:
            pixels = tv_tensors.Image(decode(image.image_path))
            if tuple(pixels.shape[-2:]) != (image.height, image.width):
                raise ValueError(
                    f"{image.image_path} is {pixels.shape[-1]} x {pixels.shape[-2]} (W x H) but "
                    f"{image.annotation_path} image id {image.image_id} says {image.width} x {image.height}"
                )
        except (ValueError, FileNotFoundError) as error:
            if self.on_bad_sample == "raise":
                raise
            return BadSample(str(image.image_path), str(error))
        keep = slice(None) if self.evaluation else ~image.iscrowd
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(
                xywh_to_xyxy(image.bbox[keep], image.height, image.width),
                format=tv_tensors.BoundingBoxFormat.XYXY,
                canvas_size=(image.height, image.width),
            ),
            "labels": image.labels[keep].clone(),
            "image_id": image.image_id,
            "orig_size": torch.tensor([image.height, image.width]),
        }
        if self.evaluation:
            target |= {
                "iscrowd": image.iscrowd.clone(),
                "area": image.area.clone(),
                "annotation_id": image.annotation_ids.clone(),
                "bbox": image.bbox.clone(),
            }
        if self.transforms is not None:
            pixels, target = self.transforms(pixels, target)
        return pixels, target


class CocoDetectionDataModule(SplitDataModule):
    """Detection on COCO-format data: each split an annotation file and the folder of its images.

    Give a split's ``<split>_annotations`` and ``<split>_images`` together; ``fit`` needs train
    and val, ``validate`` val, ``test`` and ``predict`` test. The files given must declare the
    same categories (ids and names): they make the labels ``1..K`` in ascending id order,
    ``class_names`` (background first, ``num_classes = K + 1``) and ``category_ids``, and the
    data is evaluated with pycocotools' ``COCOeval`` on the file's image and category ids
    (``protocol: coco``). Every file is read and its structure checked when the module is built;
    the images and annotation values when a split is set up (``on_bad_sample``, see
    :mod:`refvision.data.coco`). Val and test sets without a single non-crowd annotation are an
    error at setup (no AP to compute).

    Train samples go through :func:`presets.detection_train` (``"ssd"`` or ``"ssdlite"``) with
    their non-crowd annotations; others only become float and keep every annotation for
    ``COCOeval``. Batches come from :func:`~refvision.data.voc.detection_collate`.
    ``image_size`` is the square side the detector resizes to (``None``: the detector's own);
    ``mean`` / ``std`` the statistics it normalises with (``None``: the detector's own).
    """

    collate_fn = staticmethod(detection_collate)

    def __init__(
        self,
        train_annotations: str | None = None,
        train_images: str | None = None,
        val_annotations: str | None = None,
        val_images: str | None = None,
        test_annotations: str | None = None,
        test_images: str | None = None,
        preset: Literal["ssd", "ssdlite"] = "ssd",
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        batch_size: int = 32,
        num_workers: int = 4,
        pin_memory: bool = True,
        on_bad_sample: OnBadSample = "raise",
        image_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_policy(on_bad_sample)
        check_counts(batch_size=batch_size, image_size=image_size)
        check_counts(0, num_workers=num_workers)
        given = {
            "train": (train_annotations, train_images),
            "val": (val_annotations, val_images),
            "test": (test_annotations, test_images),
        }
        self.files: dict[str, tuple[CocoFile, Path]] = {}
        for split, (annotations, images) in given.items():
            if (annotations is None) != (images is None):
                missing = f"data.{split}_images" if images is None else f"data.{split}_annotations"
                raise ValueError(
                    f"{missing} is not set; expected data.{split}_annotations and data.{split}_images together"
                )
            if annotations is None or images is None:
                continue
            if not Path(images).is_dir():
                raise FileNotFoundError(f"data.{split}_images={images}: the folder does not exist")
            self.files[split] = (read_annotation_file(annotations, f"data.{split}_annotations"), Path(images))
        if not self.files:
            raise ValueError(
                "no split is given; expected data.<split>_annotations and data.<split>_images for "
                "train and val (fit) or test (test, predict)"
            )
        first, *others = (coco_file for coco_file, _ in self.files.values())
        for other in others:
            if (other.category_ids, other.class_names) != (first.category_ids, first.class_names):
                raise ValueError(
                    f"{other.path} declares the categories {_categories(other)} but {first.path} declares "
                    f"{_categories(first)}; expected the same categories (ids and names) in every split"
                )
        self.image_size = image_size
        self.train_transform = presets.detection_train(preset)
        self.eval_transform = presets.detection_eval()
        self.description = DataDescription(
            first.class_names, Statistics(mean, std), protocol="coco", category_ids=first.category_ids
        )
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.on_bad_sample = on_bad_sample

    def _dataset(self, split: str, stage: str) -> CocoDetection:
        if split not in self.files:
            raise ValueError(
                f"data.{split}_annotations is not set; {stage} needs the {split} split: give data.{split}_annotations "
                f"and data.{split}_images"
            )
        coco_file, images = self.files[split]
        train = split == "train"
        transform = self.train_transform if train else self.eval_transform
        return CocoDetection(coco_file, images, transform, self.on_bad_sample, evaluation=not train)

    def _evaluation_dataset(self, split: str, stage: str) -> CocoDetection:
        """The val / test dataset; one without any non-crowd annotation is an error (no AP to compute)."""
        dataset = self._dataset(split, stage)
        if not any((~image.iscrowd).any() for image in dataset.images):
            raise ValueError(
                f"data.{split}_annotations={dataset.coco_file.path}: none of its {len(dataset)} images holds an "
                f"annotation that is not a crowd, so there is no ground truth to compute AP on; give annotated images"
            )
        return dataset

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.train_set = self._dataset("train", stage)
        if stage in ("fit", "validate"):
            self.val_set = self._evaluation_dataset("val", stage)
        if stage == "test":
            self.test_set = self._evaluation_dataset("test", stage)
        if stage == "predict":
            self.test_set = self._dataset("test", stage)


def _categories(coco_file: CocoFile) -> str:
    return ", ".join(f"{i}: {name}" for i, name in zip(coco_file.category_ids, coco_file.class_names[1:]))
