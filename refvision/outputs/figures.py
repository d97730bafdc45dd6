"""Figures of evaluation results, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Each function returns a :class:`matplotlib.figure.Figure`; :func:`save_figure` writes it as a
PNG and :func:`figure_to_rgb` renders it to an array for image loggers such as TensorBoard.
"""

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

_DPI = 100


def per_class_bars(class_names: Sequence[str], values: Tensor, title: str, ylabel: str) -> Figure:
    """Horizontal bars of per-class scores ``(C,)`` in [0, 1], shown in percent; NaN classes are labelled ``n/a``."""
    values = values.reshape(-1).double()
    fig = Figure(figsize=(7, 0.8 + 0.3 * len(class_names)), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(class_names))
    shown = torch.nan_to_num(values, nan=0.0).numpy() * 100
    ax.barh(y, shown, color="tab:blue")
    for i, value in enumerate(values.tolist()):
        ax.text(
            0.5 if math.isnan(value) else shown[i] + 0.5,
            i,
            "n/a" if math.isnan(value) else f"{100 * value:.1f}",
            va="center",
            fontsize=8,
        )
    ax.set_yticks(y, labels=list(class_names))
    ax.invert_yaxis()
    ax.set_xlim(0, 110)
    ax.set_xlabel(f"{ylabel} (%)")
    ax.set_title(title)
    return fig


def precision_recall_curves(curves: Sequence[Tensor], class_names: Sequence[str], ap: Tensor) -> Figure:
    """One panel per class: the precision/recall curve ``(2, P)`` (recall row 0, precision row 1) and its AP."""
    if len(curves) != len(class_names):
        raise ValueError(f"curves: expected {len(class_names)}, one per class, got {len(curves)}")
    ap = ap.reshape(-1).tolist()
    cols = min(5, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig = Figure(figsize=(2.6 * cols, 2.4 * rows), dpi=_DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    for i, ax in enumerate(axes.flat):
        if i >= len(curves):
            ax.set_axis_off()
            continue
        curve = curves[i].reshape(2, -1).double()
        if curve.shape[1]:
            recall = np.concatenate(([0.0], curve[0].numpy()))
            precision = np.concatenate(([curve[1, 0].item()], curve[1].numpy()))
            ax.step(recall, precision, where="post", color="tab:blue")
        label = "no ground truth" if math.isnan(ap[i]) else f"AP {100 * ap[i]:.1f}"
        ax.set_title(f"{class_names[i]}: {label}", fontsize=9)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("recall")
    for ax in axes[:, 0]:
        ax.set_ylabel("precision")
    return fig


def confusion_matrix(confmat: Tensor, class_names: Sequence[str], title: str) -> Figure:
    """The confusion matrix ``(C, C)`` (rows true class, columns predicted), each row normalised to sum 1.

    Rows of classes absent from the targets stay empty (0). Cells are annotated when ``C <= 20``.
    """
    counts = confmat.double()
    if counts.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confmat: expected shape ({len(class_names)}, {len(class_names)}), got {tuple(counts.shape)}")
    normalised = (counts / counts.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    side = 2.5 + 0.45 * len(class_names)
    fig = Figure(figsize=(side + 1, side), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, labels=list(class_names), rotation=90)
    ax.set_yticks(ticks, labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(class_names) <= 20:
        for (i, j), value in np.ndenumerate(normalised):
            if value > 0:
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value > 0.5 else "black",
                )
    return fig


def segmentation_grid(images: Tensor, targets: Tensor, preds: Tensor, palette: Tensor, ignore_index: int) -> Figure:
    """Rows of image / ground truth / prediction.

    Args:
        images: ``(N, 3, H, W)`` ``uint8`` RGB.
        targets: ``(N, H, W)`` class ids or ``ignore_index`` (drawn black).
        preds: ``(N, H, W)`` class ids.
        palette: ``(K, 3)`` ``uint8`` colors, ``K`` above every class id shown.
    """
    n, _, height, width = images.shape
    fig = Figure(figsize=(3 * 3.0, n * 3.0 * height / width + 0.4), dpi=_DPI, layout="constrained")
    axes = fig.subplots(n, 3, squeeze=False)
    colors = torch.cat((palette.to(torch.uint8), torch.zeros(1, 3, dtype=torch.uint8)))
    for row, (image, target, pred) in enumerate(zip(images, targets, preds)):
        target = torch.where(target == ignore_index, len(palette), target.long())
        for ax, picture in zip(axes[row], (image.permute(1, 2, 0), colors[target], colors[pred.long()])):
            ax.imshow(picture.numpy())
            ax.set_axis_off()
    for ax, title in zip(axes[0], ("image", "ground truth", "prediction")):
        ax.set_title(title)
    return fig


def figure_to_rgb(figure: Figure) -> np.ndarray:
    """The rendered figure as a ``(H, W, 3)`` ``uint8`` array."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG at ``path`` (folders created); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
