"""What a data module says about its data: one typed :class:`DataDescription`.

The command carries what a description states into the model's init arguments of the same
names (``refvision.app.lightning_cli``: ``data.<name>`` -> ``model.init_args.<name>``), and
refuses a model value that contradicts it; so models, metrics and writers never import a
dataset's class list or colours, they receive them.
"""

from dataclasses import dataclass
from typing import Any, Literal

import lightning as L

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""The per-channel RGB statistics torchvision's, timm's and smp's ImageNet weights expect: the
default of the image data modules and of the models."""


@dataclass(frozen=True)
class Statistics:
    """The per-channel RGB ``mean`` / ``std`` a model normalises this data's [0, 1] input with.

    Both ``None``: the model's own (a detector's built-in statistics, SSDLite 0.5 / 0.5). Lists
    are kept as tuples of floats.
    """

    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"data.mean={self.mean}, data.std={self.std}: give both or neither")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None:
                if len(values) != 3:
                    raise ValueError(f"data.{name}={list(values)}: expected 3 values (R, G, B)")
                object.__setattr__(self, name, tuple(float(v) for v in values))


@dataclass(frozen=True)
class DataDescription:
    """The facts about a dataset that the model takes from it. ``None``: not stated.

    Args:
        class_names: the names of the classes in label order (detection: the background first);
            ``num_classes`` is their count.
        statistics: the input statistics the model normalises with (see :class:`Statistics`).
        palette: segmentation: the RGB colour (0..255) of each class, in label order.
        ignore_index: segmentation: the mask value of pixels that belong to no class.
        protocol: detection: how the data is evaluated, ``"voc"`` (the VOC devkit's mAP) or
            ``"coco"`` (pycocotools' ``COCOeval``).
        category_ids: detection: the data's own id of each foreground label (label ``i`` is
            ``category_ids[i - 1]``; the background has none), for evaluation and results files in
            the data's ids (COCO's ``category_id``).

    A field left ``None`` is one the data does not state; the model keeps its own value there
    (its config's, or its checkpoint's: a folder of plain images states nothing about classes).
    Lists are kept as tuples.
    """

    class_names: tuple[str, ...] | None = None
    statistics: Statistics | None = None
    palette: tuple[tuple[int, int, int], ...] | None = None
    ignore_index: int | None = None
    protocol: Literal["voc", "coco"] | None = None
    category_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.class_names))
        if self.protocol not in (None, "voc", "coco"):
            raise ValueError(f"data protocol={self.protocol!r}: expected 'voc' or 'coco'")
        if self.category_ids is not None:
            object.__setattr__(self, "category_ids", tuple(int(i) for i in self.category_ids))
            if self.class_names is None or len(self.category_ids) != len(self.class_names) - 1:
                classes = "no class names" if self.class_names is None else f"{len(self.class_names)} class names"
                raise ValueError(
                    f"data category_ids has {len(self.category_ids)} ids but the data has {classes}; expected one "
                    "id per class after the background"
                )
            if len(set(self.category_ids)) != len(self.category_ids):
                raise ValueError(f"data category_ids={list(self.category_ids)}: expected distinct ids")
        if self.palette is not None:
            object.__setattr__(self, "palette", tuple(tuple(int(c) for c in color) for color in self.palette))
        if self.palette is not None and (self.class_names is None or len(self.palette) != len(self.class_names)):
            classes = "no class names" if self.class_names is None else f"{len(self.class_names)} classes"
            raise ValueError(f"data palette has {len(self.palette)} colours but the data has {classes}")
        if self.ignore_index is not None and self.class_names is not None:
            if 0 <= self.ignore_index < len(self.class_names):
                raise ValueError(
                    f"data ignore_index={self.ignore_index} is a class id; expected a value outside "
                    f"0..{len(self.class_names) - 1}"
                )

    @property
    def num_classes(self) -> int | None:
        """How many classes the data has (``len(class_names)``), or ``None`` when not stated."""
        return None if self.class_names is None else len(self.class_names)

    def stated(self) -> dict[str, Any]:
        """What this description states, as the model's init argument names: ``num_classes``,
        ``class_names``, ``mean``, ``std``, ``palette``, ``ignore_index``, ``protocol``,
        ``category_ids`` -> value, for each stated."""
        values: dict[str, Any] = {}
        if self.class_names is not None:
            values |= {"num_classes": self.num_classes, "class_names": self.class_names}
        if self.statistics is not None:
            values |= {"mean": self.statistics.mean, "std": self.statistics.std}
        if self.palette is not None:
            values["palette"] = self.palette
        if self.ignore_index is not None:
            values["ignore_index"] = self.ignore_index
        if self.protocol is not None:
            values["protocol"] = self.protocol
        if self.category_ids is not None:
            values["category_ids"] = self.category_ids
        return values


class DescribedDataModule(L.LightningDataModule):
    """A data module that describes its data: subclasses set :attr:`description` in ``__init__``.

    The attributes below read it, for the command's links (``data.num_classes`` ->
    ``model.init_args.num_classes``, ...). One the description does not state raises
    ``AttributeError``, so the data module lacks it and jsonargparse skips that link.
    """

    description: DataDescription

    def _stated(self, name: str) -> Any:
        stated = self.description.stated()
        if name not in stated:
            raise AttributeError(f"{type(self).__name__} does not state {name}")
        return stated[name]

    @property
    def num_classes(self) -> int:
        """How many classes the data has."""
        return self._stated("num_classes")

    @property
    def class_names(self) -> list[str]:
        """The class names in label order."""
        return list(self._stated("class_names"))

    @property
    def mean(self) -> tuple[float, float, float] | None:
        """Per-channel RGB mean the model normalises this data with (``None``: the model's own)."""
        return self._stated("mean")

    @property
    def std(self) -> tuple[float, float, float] | None:
        """Per-channel RGB standard deviation, as :attr:`mean`."""
        return self._stated("std")

    @property
    def palette(self) -> list[tuple[int, int, int]]:
        """RGB colour of each class, in label order."""
        return list(self._stated("palette"))

    @property
    def ignore_index(self) -> int:
        """The mask value of pixels that belong to no class."""
        return self._stated("ignore_index")

    @property
    def protocol(self) -> str:
        """Detection: how the data is evaluated (``"voc"`` or ``"coco"``)."""
        return self._stated("protocol")

    @property
    def category_ids(self) -> list[int]:
        """Detection: the data's own id of each foreground label."""
        return list(self._stated("category_ids"))
