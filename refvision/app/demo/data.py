"""Deterministic writers of small datasets in the real on-disk formats.

Images are drawn with numpy from a seeded generator: textured backgrounds (gradients, blotches,
noise) carrying objects or regions of varied shape, size, position and color, so that small
models can actually learn them. Each writer records its parameters in ``root/.refvision-demo.json``;
calling it again with the same parameters returns at once, and with different ones raises
(nothing is ever overwritten). The same seed gives byte-identical files.
"""

import functools
import json
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from refvision.app.demo.canvas import (
    MANIFEST,
    Array,
    background,
    claim,
    contrasting,
    grid,
    paint_region,
    save_image,
    to_uint8,
)
from refvision.data.cityscapes_labels import ID_TO_TRAINID, LABEL_BY_ID
from refvision.data.voc_format import VOC_CLASSES

DEMO_VOC_VAL_IMAGES = 24
"""Size of the demo VOCdevkit's val set (train 96, test 32: the writer's defaults)."""


def _pattern(kind: str, rng: np.random.Generator, yy: Array, xx: Array, y0: float, x0: float) -> Array:
    period = rng.uniform(0.1, 0.22) * yy.shape[0]
    if kind == "stripes":
        angle = rng.uniform(0, np.pi)
        return np.floor((np.cos(angle) * xx + np.sin(angle) * yy) / (period / 2)) % 2 == 0
    return (np.floor((xx - x0) / (period / 2)) + np.floor((yy - y0) / (period / 2))) % 2 == 0


def _draw_class(kind: str, rng: np.random.Generator, size: int) -> Array:
    """One ``(size, size, 3) uint8`` image: 2-4 non-overlapping shapes ("circle", "square") or
    one textured patch ("stripes", "checker"), random color, scale and position, on a background."""
    image = background(rng, size, size)
    yy, xx = grid(size, size)
    if kind in ("stripes", "checker"):
        side = rng.uniform(0.6, 1.0) * size
        y0, x0 = rng.uniform(0, size - side, 2)
        mask = (yy >= y0) & (yy < y0 + side) & (xx >= x0) & (xx < x0 + side)
        color = contrasting(rng, image[mask].mean(axis=0))
        on = _pattern(kind, rng, yy, xx, y0, x0)
        paint_region(image, mask & on, color, rng)
        paint_region(image, mask & ~on, contrasting(rng, color), rng)
        return to_uint8(image)
    taken = np.zeros((size, size), bool)
    for _ in range(rng.integers(2, 5)):
        for _attempt in range(10):  # look for a free spot; without one, draw no more shapes
            half = rng.uniform(0.1, 0.25) * size
            cy, cx = rng.uniform(half, size - half, 2)
            if kind == "circle":
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= half**2
            else:
                mask = (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)
            if not (mask & taken).any():
                break
        else:
            break
        paint_region(image, mask, contrasting(rng, image[mask].mean(axis=0)), rng)
        taken |= mask
    return to_uint8(image)


IMAGEFOLDER_CLASSES = ("circle", "square", "stripes", "checker")


def write_imagefolder(
    root: str | Path,
    classes: Sequence[str] = IMAGEFOLDER_CLASSES,
    train_per_class: int = 48,
    val_per_class: int = 16,
    size: int = 64,
    seed: int = 0,
    test_per_class: int | None = None,
) -> Path:
    """Write ``root/{train,val,test}/<class>/<class>_<i>.{jpg,png}`` (JPEG and PNG alternate).

    ``classes`` are taken from :data:`IMAGEFOLDER_CLASSES` (each name selects how it is drawn).
    ``test_per_class`` defaults to ``val_per_class``; the three splits are drawn independently,
    so no image is in two of them. Returns ``root``.
    """
    root = Path(root)
    unknown = set(classes) - set(IMAGEFOLDER_CLASSES)
    if unknown:
        raise ValueError(f"unknown demo classes {sorted(unknown)}; available: {IMAGEFOLDER_CLASSES}")
    test_per_class = val_per_class if test_per_class is None else test_per_class
    params = dict(
        classes=list(classes),
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        test_per_class=test_per_class,
        size=size,
        seed=seed,
    )
    record = claim(root, "imagefolder", params)
    if record is None:
        return root
    splits = (("train", train_per_class), ("val", val_per_class), ("test", test_per_class))
    for split_index, (split, count) in enumerate(splits):
        for class_index, name in enumerate(classes):
            for i in range(count):
                rng = np.random.default_rng([seed, split_index, class_index, i])
                suffix = ".jpg" if i % 2 == 0 else ".png"
                save_image(_draw_class(name, rng, size), root / split / name / f"{name}_{i:04d}{suffix}")
    (root / MANIFEST).write_text(json.dumps(record, indent=2))
    return root


# ---------------------------------------------------------------- Pascal VOC


def _object_mask(shape: str, u: Array, v: Array) -> Array:
    """Shape mask in box-relative coordinates ``u, v`` (0..1 inside the object's box)."""
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    if shape == "bottle":
        return inside & ((np.abs(u - 0.5) < 0.4) & (v > 0.3) | (np.abs(u - 0.5) < 0.15))
    if shape == "car":
        body = (v >= 0.3) & (v < 0.8)
        cabin = (u >= 0.2) & (u < 0.75) & (v < 0.35)
        wheels = ((u - 0.22) ** 2 + ((v - 0.8) * 0.5) ** 2 < 0.012) | ((u - 0.78) ** 2 + ((v - 0.8) * 0.5) ** 2 < 0.012)
        return inside & (body | cabin | wheels)
    if shape == "cat":
        return inside & (np.abs(u - 0.5) <= v / 2)
    if shape == "person":
        head = ((u - 0.5) / 0.22) ** 2 + ((v - 0.1) / 0.1) ** 2 <= 1
        body = (np.abs(u - 0.5) < 0.4) & (v >= 0.2) & (v < 0.62)
        legs = (v >= 0.62) & (((u >= 0.14) & (u < 0.42)) | ((u >= 0.58) & (u < 0.86)))
        return inside & (head | body | legs)
    if shape == "diamond":
        return np.abs(u - 0.5) + np.abs(v - 0.5) <= 0.5
    return inside & ((u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25) & ((u - 0.5) ** 2 + (v - 0.5) ** 2 >= 0.08)


# (shape, height / width range, base color): class ``i`` of a demo VOC set is drawn with style ``i``.
_VOC_STYLES = (
    ("bottle", (1.8, 2.8), (40, 150, 70)),
    ("car", (0.45, 0.65), (200, 40, 40)),
    ("cat", (0.8, 1.2), (235, 140, 30)),
    ("person", (1.8, 2.6), (50, 80, 210)),
    ("diamond", (0.8, 1.25), (150, 60, 190)),
    ("ring", (0.8, 1.25), (230, 220, 40)),
)


VOCObject = tuple[int, tuple[int, int, int, int], bool, bool]
"""``(class index, VOC box (xmin, ymin, xmax, ymax), difficult, truncated)``."""


def _voc_image(rng: np.random.Generator, height: int, width: int, num_classes: int) -> tuple[Array, list[VOCObject]]:
    """An image with 1-3 objects: ``(image (H, W, 3) uint8, objects)``.

    VOC boxes are 1-based inclusive pixel indices of the visible shape. Objects smaller than
    a fifth of the image side are marked difficult; objects cut by the border, truncated.
    """
    image = background(rng, height, width)
    yy, xx = grid(height, width)
    objects = []
    count = rng.integers(1, 4)
    while len(objects) < count:
        class_index = int(rng.integers(num_classes))
        shape, (low, high), color = _VOC_STYLES[class_index]
        box_w = rng.uniform(0.12, 0.55) * min(height, width)
        box_h = min(box_w * rng.uniform(low, high), 0.95 * height)
        x0 = rng.uniform(-0.25 * box_w, width - 0.75 * box_w)
        y0 = rng.uniform(-0.25 * box_h, height - 0.75 * box_h)
        mask = _object_mask(shape, (xx - x0) / box_w, (yy - y0) / box_h)
        rows, cols = np.nonzero(mask)
        if len(rows) < 30:
            continue
        paint_region(image, mask, np.clip(np.asarray(color) + rng.normal(0, 25, 3), 0, 255), rng)
        box = (int(cols.min()) + 1, int(rows.min()) + 1, int(cols.max()) + 1, int(rows.max()) + 1)
        crosses = x0 < 0 or y0 < 0 or x0 + box_w > width or y0 + box_h > height
        touches = box[0] == 1 or box[1] == 1 or box[2] == width or box[3] == height
        difficult = max(box[2] - box[0], box[3] - box[1]) + 1 < 0.2 * min(height, width)
        objects.append((class_index, box, difficult, crosses and touches))
    return to_uint8(image), objects


def _voc_xml(
    year: str, filename: str, height: int, width: int, objects: list[VOCObject], classes: Sequence[str]
) -> ET.Element:
    def child(parent: ET.Element, tag: str, text: object = None) -> ET.Element:
        node = ET.SubElement(parent, tag)
        if text is not None:
            node.text = str(text)
        return node

    root = ET.Element("annotation")
    child(root, "folder", f"VOC{year}")
    child(root, "filename", filename)
    source = child(root, "source")
    child(source, "database", f"The VOC{year} Database")
    size = child(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        child(size, tag, value)
    child(root, "segmented", 0)
    for class_index, box, difficult, truncated in objects:
        obj = child(root, "object")
        child(obj, "name", classes[class_index])
        child(obj, "pose", "Unspecified")
        child(obj, "truncated", int(truncated))
        child(obj, "difficult", int(difficult))
        bndbox = child(obj, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
            child(bndbox, tag, value)
    ET.indent(root, space="\t")
    return root


def write_vocdevkit(
    root: str | Path,
    years: Sequence[str] = ("2007",),
    num_train: int = 96,
    num_test: int = 32,
    size: tuple[int, int] = (160, 160),
    classes: Sequence[str] = ("bottle", "car", "cat", "person"),
    seed: int = 0,
    num_val: int | None = None,
) -> Path:
    """Write a ``VOCdevkit`` folder ``root`` with ``VOC<year>/{Annotations, JPEGImages, ImageSets/Main}``.

    Per year, as in the real sets: ``train.txt`` (``num_train`` images), ``val.txt`` (``num_val``,
    default ``num_test``), ``trainval.txt`` (both) and ``test.txt`` (``num_test``), disjoint apart
    from trainval; images are about ``size`` (H, W) +-20 %. Ids are ``000001``... for 2007 and
    ``<year>_000001``... otherwise. Returns ``root``.
    """
    root = Path(root)
    unknown = set(classes) - set(VOC_CLASSES)
    if unknown or not 0 < len(classes) <= len(_VOC_STYLES):
        raise ValueError(f"classes must be 1..{len(_VOC_STYLES)} names from VOC_CLASSES, got {list(classes)}")
    if min(size) < 32:
        raise ValueError(f"size must be at least 32 x 32 so that objects stay visible, got {size}")
    num_val = num_test if num_val is None else num_val
    params = dict(
        years=list(years),
        num_train=num_train,
        num_val=num_val,
        num_test=num_test,
        size=list(size),
        classes=list(classes),
        seed=seed,
    )
    record = claim(root, "vocdevkit", params)
    if record is None:
        return root
    for year in years:
        year_dir = root / f"VOC{year}"
        ids = [
            f"{i:06d}" if year == "2007" else f"{year}_{i:06d}" for i in range(1, num_train + num_val + num_test + 1)
        ]
        for index, image_id in enumerate(ids):
            rng = np.random.default_rng([seed, int(year), index])
            height, width = (int(round(s * rng.uniform(0.8, 1.2))) for s in size)
            image, objects = _voc_image(rng, height, width, len(classes))
            save_image(image, year_dir / "JPEGImages" / f"{image_id}.jpg")
            xml = _voc_xml(year, f"{image_id}.jpg", height, width, objects, classes)
            (year_dir / "Annotations").mkdir(parents=True, exist_ok=True)
            ET.ElementTree(xml).write(year_dir / "Annotations" / f"{image_id}.xml", encoding="unicode")
        trainval = ids[: num_train + num_val]
        splits = {
            "train": trainval[:num_train],
            "val": trainval[num_train:],
            "trainval": trainval,
            "test": ids[num_train + num_val :],
        }
        (year_dir / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
        for split, members in splits.items():
            (year_dir / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{m}\n" for m in members))
    (root / MANIFEST).write_text(json.dumps(record, indent=2))
    return root


# ---------------------------------------------------------------- Cityscapes

# Base photo color of each rendered Cityscapes label id (the label colors are LABEL_BY_ID's).
_CITY_COLORS = {
    0: (25, 25, 25),
    1: (35, 30, 40),
    7: (90, 88, 95),
    8: (170, 160, 150),
    17: (60, 60, 60),
    21: (60, 120, 40),
    23: (120, 170, 225),
}


def _city_scene(rng: np.random.Generator, height: int, width: int) -> tuple[Array, Array, Array]:
    """A street scene: ``(image (H, W, 3) uint8, label ids (H, W) uint8, instance ids (H, W) uint16)``.

    Sky on top; buildings and trees along a skyline; sidewalk and a road widening towards the
    bottom; poles, cars on the road, people on the sidewalk; sometimes an ego-vehicle hood and
    unlabeled specks. Instance ids follow Cityscapes: ``id * 1000 + k`` for cars and people.
    """
    yy, xx = grid(height, width)
    image = np.zeros((height, width, 3))
    labels = np.zeros((height, width), np.uint8)
    instances = np.zeros((height, width), np.uint16)

    def paint(
        mask: Array,
        label_id: int,
        color: Sequence[float] | None = None,
        noise: float = 8.0,
        instance: int | None = None,
    ) -> None:
        base = _CITY_COLORS[label_id] if color is None else color
        paint_region(image, mask, np.clip(np.asarray(base) + rng.normal(0, 15, 3), 0, 255), rng, noise)
        labels[mask] = label_id
        instances[mask] = label_id if instance is None else label_id * 1000 + instance

    horizon = height * rng.uniform(0.35, 0.5)
    paint(yy < horizon, 23, noise=3)
    image[yy < horizon] += (yy[yy < horizon] / horizon * 40)[:, None]
    x = 0.0
    while x < width:
        seg = rng.uniform(0.08, 0.25) * width
        top = rng.uniform(0.03, 0.7) * horizon
        column = (xx >= x) & (xx < x + seg) & (yy < horizon)
        if rng.random() < 0.7:
            paint(column & (yy >= top), 11, rng.uniform(70, 170, 3), noise=10)
            windows = column & (yy >= top + 4) & ((yy // 6) % 2 == 0) & ((xx // 5) % 2 == 0)
            image[windows] *= 0.6
        else:
            crown_x = (xx - x - seg / 2) / (seg / 1.6)
            crown_y = (yy - (top + horizon) / 2) / ((horizon - top) / 1.8)
            paint((crown_x**2 + crown_y**2 <= 1) & (yy < horizon), 21, noise=25)
        x += seg
    paint(yy >= horizon, 8, noise=10)
    center = width * rng.uniform(0.35, 0.65)
    spread = rng.uniform(0.45, 0.8) * width

    def half(y: Array | float) -> Array | float:
        """Half width of the road at row ``y``."""
        return 0.03 * width + (y - horizon) / (height - horizon) * spread / 2

    road = (yy >= horizon) & (np.abs(xx - center) <= half(yy))
    paint(road, 7, noise=6)
    image[road & (np.abs(xx - center) < 1.5) & ((yy // 8) % 2 == 0)] = 230  # lane marking, still road
    for _ in range(rng.integers(0, 3)):
        px, bottom = rng.uniform(0, width), rng.uniform(horizon, height)
        paint((np.abs(xx - px) < max(1.0, width / 150)) & (yy < bottom) & (yy > bottom - 0.6 * height), 17)
    for k in range(rng.integers(1, 4)):
        bottom = rng.uniform(horizon + 0.15 * (height - horizon), height)
        car_w = 0.3 * half(bottom) + 4
        cx = center + rng.uniform(-0.7, 0.7) * half(bottom)
        u, v = (xx - cx) / car_w + 0.5, (yy - bottom) / (0.55 * car_w) + 1
        paint(_object_mask("car", u, v), 26, rng.uniform(0, 255, 3), instance=k)
    for k in range(rng.integers(0, 4)):
        bottom = rng.uniform(horizon + 0.1 * (height - horizon), height)
        side = rng.choice([-1, 1])
        px = center + side * (half(bottom) + rng.uniform(2, 0.1 * width + 3))
        person_h = 0.25 * half(bottom) + 8
        u, v = (xx - px) / (0.4 * person_h) + 0.5, (yy - bottom) / person_h + 1
        paint(_object_mask("person", u, v), 24, rng.uniform(0, 255, 3), instance=k)
    if rng.random() < 0.5:
        paint(yy > height * (0.93 - 0.04 * np.cos((xx / width - 0.5) * np.pi)), 1, noise=4)
    for _ in range(rng.integers(0, 4)):
        sy, sx = rng.uniform(0, height), rng.uniform(0, width)
        paint((np.abs(yy - sy) < 2) & (np.abs(xx - sx) < 3), 0)
    image *= rng.uniform(0.8, 1.2)
    return to_uint8(image + rng.normal(0, 3, image.shape)), labels, instances


def write_cityscapes(
    root: str | Path,
    cities_train: Sequence[str] = ("aachen", "bochum"),
    cities_val: Sequence[str] = ("frankfurt",),
    num_train: int = 24,
    num_val: int = 8,
    size: tuple[int, int] = (128, 256),
    seed: int = 0,
    with_train_ids: bool = False,
    cities_test: Sequence[str] = ("munich",),
    num_test: int | None = None,
) -> Path:
    """Write a Cityscapes tree under ``root``: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and
    ``gtFine/<split>/<city>/*_gtFine_{labelIds,color,instanceIds}.png`` (+ ``labelTrainIds``
    when ``with_train_ids``) for the splits train, val and test (``num_test`` defaults to
    ``num_val``), each split from its own cities, images of ``size`` (H, W). Unlike the real
    test split, the demo's test labels are real. Returns ``root``.
    """
    root = Path(root)
    num_test = num_val if num_test is None else num_test
    params = dict(
        cities_train=list(cities_train),
        cities_val=list(cities_val),
        cities_test=list(cities_test),
        num_train=num_train,
        num_val=num_val,
        num_test=num_test,
        size=list(size),
        seed=seed,
        with_train_ids=with_train_ids,
    )
    record = claim(root, "cityscapes", params)
    if record is None:
        return root
    colors = np.zeros((256, 3), np.uint8)
    for label in LABEL_BY_ID.values():
        colors[label.id] = label.color
    splits = (("train", cities_train, num_train), ("val", cities_val, num_val), ("test", cities_test, num_test))
    for split_index, (split, cities, count) in enumerate(splits):
        for i in range(count):
            city = cities[i % len(cities)]
            name = f"{city}_{i // len(cities):06d}_000019"
            image, labels, instances = _city_scene(np.random.default_rng([seed, split_index, i]), *size)
            save_image(image, root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
            gt = root / "gtFine" / split / city / f"{name}_gtFine"
            save_image(labels, Path(f"{gt}_labelIds.png"))
            save_image(colors[labels], Path(f"{gt}_color.png"))
            save_image(instances, Path(f"{gt}_instanceIds.png"))
            if with_train_ids:
                save_image(ID_TO_TRAINID.numpy()[labels], Path(f"{gt}_labelTrainIds.png"))
    (root / MANIFEST).write_text(json.dumps(record, indent=2))
    return root


def ensure_demo_data(root: str | Path) -> dict[str, Path]:
    """Write (or find) all three demo datasets with default parameters.

    Returns ``{"imagefolder": root/imagefolder, "voc": root/VOCdevkit, "cityscapes": root/cityscapes}``.
    """
    root = Path(root)
    writers: dict[str, tuple[Callable[[Path], Path], str]] = {
        "imagefolder": (write_imagefolder, "imagefolder"),
        "voc": (functools.partial(write_vocdevkit, num_val=DEMO_VOC_VAL_IMAGES), "VOCdevkit"),
        "cityscapes": (write_cityscapes, "cityscapes"),
    }
    return {key: writer(root / folder) for key, (writer, folder) in writers.items()}
