"""The official Cityscapes label table and everything derived from it, decided once.

The table is cityscapesScripts' ``helpers/labels.py``: 34 label ids (0..33) as stored in
``*_gtFine_labelIds.png`` plus "license plate" (id -1, never written to label images).
Training uses the 19 classes with ``train_id`` 0..18; every other id maps to 255 (ignored).
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class Label(NamedTuple):
    """One row of the Cityscapes label table (field names as in cityscapesScripts)."""

    name: str
    id: int
    train_id: int
    category: str
    category_id: int
    has_instances: bool
    ignore_in_eval: bool
    color: tuple[int, int, int]


IGNORE_INDEX = 255
"""Train id of every pixel that is not one of the 19 training classes."""

LABELS: tuple[Label, ...] = (
    Label("unlabeled", 0, 255, "void", 0, False, True, (0, 0, 0)),
    Label("ego vehicle", 1, 255, "void", 0, False, True, (0, 0, 0)),
    Label("rectification border", 2, 255, "void", 0, False, True, (0, 0, 0)),
    Label("out of roi", 3, 255, "void", 0, False, True, (0, 0, 0)),
    Label("static", 4, 255, "void", 0, False, True, (0, 0, 0)),
    Label("dynamic", 5, 255, "void", 0, False, True, (111, 74, 0)),
    Label("ground", 6, 255, "void", 0, False, True, (81, 0, 81)),
    Label("road", 7, 0, "flat", 1, False, False, (128, 64, 128)),
    Label("sidewalk", 8, 1, "flat", 1, False, False, (244, 35, 232)),
    Label("parking", 9, 255, "flat", 1, False, True, (250, 170, 160)),
    Label("rail track", 10, 255, "flat", 1, False, True, (230, 150, 140)),
    Label("building", 11, 2, "construction", 2, False, False, (70, 70, 70)),
    Label("wall", 12, 3, "construction", 2, False, False, (102, 102, 156)),
    Label("fence", 13, 4, "construction", 2, False, False, (190, 153, 153)),
    Label("guard rail", 14, 255, "construction", 2, False, True, (180, 165, 180)),
    Label("bridge", 15, 255, "construction", 2, False, True, (150, 100, 100)),
    Label("tunnel", 16, 255, "construction", 2, False, True, (150, 120, 90)),
    Label("pole", 17, 5, "object", 3, False, False, (153, 153, 153)),
    Label("polegroup", 18, 255, "object", 3, False, True, (153, 153, 153)),
    Label("traffic light", 19, 6, "object", 3, False, False, (250, 170, 30)),
    Label("traffic sign", 20, 7, "object", 3, False, False, (220, 220, 0)),
    Label("vegetation", 21, 8, "nature", 4, False, False, (107, 142, 35)),
    Label("terrain", 22, 9, "nature", 4, False, False, (152, 251, 152)),
    Label("sky", 23, 10, "sky", 5, False, False, (70, 130, 180)),
    Label("person", 24, 11, "human", 6, True, False, (220, 20, 60)),
    Label("rider", 25, 12, "human", 6, True, False, (255, 0, 0)),
    Label("car", 26, 13, "vehicle", 7, True, False, (0, 0, 142)),
    Label("truck", 27, 14, "vehicle", 7, True, False, (0, 0, 70)),
    Label("bus", 28, 15, "vehicle", 7, True, False, (0, 60, 100)),
    Label("caravan", 29, 255, "vehicle", 7, True, True, (0, 0, 90)),
    Label("trailer", 30, 255, "vehicle", 7, True, True, (0, 0, 110)),
    Label("train", 31, 16, "vehicle", 7, True, False, (0, 80, 100)),
    Label("motorcycle", 32, 17, "vehicle", 7, True, False, (0, 0, 230)),
    Label("bicycle", 33, 18, "vehicle", 7, True, False, (119, 11, 32)),
    Label("license plate", -1, -1, "vehicle", 7, False, True, (0, 0, 142)),
)

LABEL_BY_ID: dict[int, Label] = {label.id: label for label in LABELS if label.id >= 0}
"""Label ids that may appear in a ``labelIds`` PNG (0..33) -> their row."""

LABEL_IDS: frozenset[int] = frozenset(LABEL_BY_ID)
"""The valid values of a ``labelIds`` PNG; any other value is a corrupt label file."""

_TRAIN_LABELS = sorted(
    (label for label in LABELS if 0 <= label.train_id < IGNORE_INDEX), key=lambda label: label.train_id
)

TRAIN_CLASSES: tuple[str, ...] = tuple(label.name for label in _TRAIN_LABELS)
"""The 19 training class names; segmentation class ``i`` is ``TRAIN_CLASSES[i]``."""

PALETTE: tuple[tuple[int, int, int], ...] = tuple(label.color for label in _TRAIN_LABELS)
"""RGB color of each training class, indexed by train id."""

TRAIN_IDS: frozenset[int] = frozenset(range(len(TRAIN_CLASSES))) | {IGNORE_INDEX}
"""The valid values of a ``labelTrainIds`` PNG: 0..18 and 255."""

ID_TO_TRAINID = torch.full((256,), IGNORE_INDEX, dtype=torch.uint8)
"""Lookup table ``(256,) uint8``: ``ID_TO_TRAINID[label_ids]`` maps a ``labelIds`` image to train
ids. Entries outside :data:`LABEL_IDS` are 255 too, so validate against ``LABEL_IDS`` first."""
ID_TO_TRAINID[list(LABEL_BY_ID)] = torch.tensor([label.train_id for label in LABEL_BY_ID.values()], dtype=torch.uint8)

LABEL_BY_NAME: dict[str, Label] = {label.name: label for label in LABEL_BY_ID.values()}
"""The name of a label (as cityscapesScripts spells it, ``traffic light``) -> its row."""


def label_ids(class_names: Sequence[str]) -> Tensor:
    """Lookup table ``(len(class_names),) uint8``: ``label_ids(names)[classes]`` gives the official
    label ids (those of ``*_gtFine_labelIds.png`` and the evaluator) of class ids whose names are
    ``class_names``. A name that is not a Cityscapes label is a ``ValueError`` naming it."""
    unknown = [name for name in class_names if name not in LABEL_BY_NAME]
    if unknown:
        raise ValueError(f"classes {unknown} are not Cityscapes labels; expected names from {list(LABEL_BY_NAME)}")
    return torch.tensor([LABEL_BY_NAME[name].id for name in class_names], dtype=torch.uint8)


TRAINID_TO_ID = label_ids(TRAIN_CLASSES)
"""Lookup table ``(19,) uint8``: ``TRAINID_TO_ID[train_ids]`` gives the label ids that
``*_gtFine_labelIds.png`` files and the official evaluator use."""
