"""Per-class result tables as aligned text, for logs and the test step's printout."""

import math
from collections.abc import Sequence

from torch import Tensor

# result key of the per-class values -> (column title, result key of the mean, its row label)
_LAYOUTS = {
    "ap_per_class": ("AP", "map", "mAP"),
    "iou_per_class": ("IoU", "miou", "mIoU"),
}


def format_table(result: dict[str, Tensor], class_names: Sequence[str] | None = None) -> str:
    """Render the per-class values of a metric result, one class a line, then the mean.

    Args:
        result: the dict returned by :meth:`VOCMeanAveragePrecision.compute`
            (``ap_per_class``, ``map``) or :meth:`MeanIoU.compute` (``iou_per_class``, ``miou``).
        class_names: one name per class; ``class <i>`` (0-based position) when omitted.

    Values are shown as percentages with two decimals; ``-`` marks NaN (class left out of
    the mean).
    """
    key = next((k for k in _LAYOUTS if k in result), None)
    if key is None:
        raise ValueError(f"result: expected one of the keys {sorted(_LAYOUTS)}, got {sorted(result)}")
    title, mean_key, mean_label = _LAYOUTS[key]
    values = result[key].reshape(-1).tolist()  # torchmetrics squeezes one class to 0-dim
    if class_names is None:
        class_names = [f"class {i}" for i in range(len(values))]
    elif len(class_names) != len(values):
        raise ValueError(f"class_names: expected {len(values)} names, got {len(class_names)}")
    rows = list(zip(class_names, values)) + [(mean_label, float(result[mean_key]))]
    width = max(len(title), 6)
    name_width = max(len(name) for name, _ in rows)
    lines = [f"{'class':<{name_width}}  {title:>{width}}"]
    lines += [f"{name:<{name_width}}  {_percent(value):>{width}}" for name, value in rows[:-1]]
    lines.append("-" * (name_width + 2 + width))
    name, value = rows[-1]
    lines.append(f"{name:<{name_width}}  {_percent(value):>{width}}")
    return "\n".join(lines)


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{100.0 * value:.2f}"
