"""Result tables: one renderer (rich) for the console, and per-class tables saved as CSV.

Tables are drawn by :func:`refvision.utils.text_table.render_table`, the one renderer of refvision.
"""

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from refvision.utils.text_table import render_table


@dataclass(frozen=True)
class PerClassTable:
    """Per-class scores of one evaluation.

    Attributes:
        class_names: the row labels, one per class.
        columns: column title -> ``(C,)`` values: scores in [0, 1] (NaN where a class has
            none), or counts (a confusion matrix: one column per predicted class).
        means: column title -> the summary the metric reports (drawn as the last row).
        mean_label: label of the summary row (``mAP``, ``mIoU``...).
        title: what the table shows, printed above it.
        row_title: header of the class column.
    """

    class_names: tuple[str, ...]
    columns: Mapping[str, Tensor]
    means: Mapping[str, float]
    mean_label: str = "mean"
    title: str = "per-class scores"
    row_title: str = "class"

    def __post_init__(self) -> None:
        for title, values in self.columns.items():
            if values.reshape(-1).numel() != len(self.class_names):
                raise ValueError(
                    f"column {title!r}: expected {len(self.class_names)} values, one per class, "
                    f"got {values.reshape(-1).numel()}"
                )

    def values(self, title: str) -> list[float]:
        """Column ``title`` as Python floats (torchmetrics squeezes one class to a 0-dim tensor)."""
        return self.columns[title].reshape(-1).tolist()

    def render(self, terminal: bool | None = None) -> str:
        """The table as text (see :func:`render_table`), values as percentages, ``-`` for NaN."""
        titles = list(self.columns)
        rows = [[name, *(_percent(self.values(t)[i]) for t in titles)] for i, name in enumerate(self.class_names)]
        footer = (
            [[self.mean_label, *(_percent(self.means[t]) if t in self.means else "" for t in titles)]]
            if self.means
            else []
        )
        return render_table([self.row_title, *titles], rows, footer, terminal)

    def save_csv(self, path: str | Path) -> Path:
        """Write ``<row_title>,<titles...>``, one row per class, values as stored (fractions at full precision).

        NaN is written ``nan`` (read back by ``float``); the summary row is left out (it is in the
        logged metrics). Returns ``path``.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        titles = list(self.columns)
        columns = [self.values(t) for t in titles]
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([self.row_title, *titles])
            for i, name in enumerate(self.class_names):
                writer.writerow([name, *(repr(values[i]) for values in columns)])
        return path


# result key of the per-class values -> (column title, result key of the mean, its row label)
_LAYOUTS = {
    "ap_per_class": ("AP", "map", "mAP"),
    "iou_per_class": ("IoU", "miou", "mIoU"),
}


def per_class_table(result: Mapping[str, Tensor], class_names: Sequence[str] | None = None) -> PerClassTable:
    """The per-class table of a metric result.

    Args:
        result: the dict returned by :meth:`VOCMeanAveragePrecision.compute`
            (``ap_per_class``, ``map``) or :meth:`MeanIoU.compute` (``iou_per_class``, ``miou``).
        class_names: one name per class; ``class <i>`` (0-based position) when omitted.
    """
    key = next((k for k in _LAYOUTS if k in result), None)
    if key is None:
        raise ValueError(f"result: expected one of the keys {sorted(_LAYOUTS)}, got {sorted(result)}")
    title, mean_key, mean_label = _LAYOUTS[key]
    values = result[key].reshape(-1).to(torch.float64)
    if class_names is None:
        class_names = [f"class {i}" for i in range(len(values))]
    elif len(class_names) != len(values):
        raise ValueError(f"class_names: expected {len(values)} names, got {len(class_names)}")
    return PerClassTable(
        tuple(class_names), {title: values}, {title: float(result[mean_key])}, mean_label, f"per-class {title}"
    )


def confusion_table(confmat: Tensor, class_names: Sequence[str]) -> PerClassTable:
    """The counts of a confusion matrix ``(C, C)``: a row per true class, a column per predicted class."""
    if confmat.shape != (len(class_names), len(class_names)):
        raise ValueError(
            f"confmat: expected shape ({len(class_names)}, {len(class_names)}), got {tuple(confmat.shape)}"
        )
    columns = {name: confmat[:, j] for j, name in enumerate(class_names)}
    return PerClassTable(tuple(class_names), columns, {}, title="confusion matrix", row_title="true \\ predicted")


def format_table(
    result: Mapping[str, Tensor], class_names: Sequence[str] | None = None, terminal: bool | None = False
) -> str:
    """Render the per-class values of a metric result, one class a line, then the mean.

    See :func:`per_class_table` for the arguments. Values are shown as percentages with two
    decimals; ``-`` marks NaN (class left out of the mean). Plain text unless ``terminal``.
    """
    return per_class_table(result, class_names).render(terminal)


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{100.0 * value:.2f}"
