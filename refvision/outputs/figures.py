"""Figures of evaluation results, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Each function returns a :class:`matplotlib.figure.Figure`; :func:`caption_figure` titles it with
what was evaluated (:func:`run_caption`: model, checkpoint file and form), :func:`save_figure`
writes it as a PNG and :func:`figure_to_rgb` renders it to an array for image loggers such as
TensorBoard.
"""

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor

_DPI = 100
_LEGEND_COLUMNS = 5
_CAPTION_POINTS = 10
_FORMS = {"train": "training", "deploy": "deploy"}
MAX_NAMED = 8
"""Classes without ground truth named in a precision/recall figure's footnote (more: only counted)."""


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
    """One panel per class with ground truth: its precision/recall curve ``(2, P)`` (recall row 0,
    precision row 1) and its AP (``no detections`` on a panel without a curve).

    Classes without ground truth (AP NaN: no curve, no AP) get no panel; a footnote gives their
    count, and their names when at most :data:`MAX_NAMED` of them.
    """
    if len(curves) != len(class_names):
        raise ValueError(f"curves: expected {len(class_names)}, one per class, got {len(curves)}")
    ap = ap.reshape(-1).tolist()
    shown = [i for i, value in enumerate(ap) if not math.isnan(value)]
    absent = [class_names[i] for i, value in enumerate(ap) if math.isnan(value)]
    cols = min(5, max(1, len(shown)))
    rows = max(1, math.ceil(len(shown) / cols))
    fig = Figure(figsize=(max(5.5, 2.6 * cols + 0.4), 2.4 * rows + 0.5), dpi=_DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    for slot, ax in enumerate(axes.flat):
        if slot >= len(shown):
            ax.set_axis_off()
            continue
        i = shown[slot]
        curve = curves[i].reshape(2, -1).double()
        if curve.shape[1]:
            recall = np.concatenate(([0.0], curve[0].numpy()))
            precision = np.concatenate(([curve[1, 0].item()], curve[1].numpy()))
            ax.step(recall, precision, where="post", color="tab:blue")
        else:
            ax.text(0.5, 0.5, "no detections", ha="center", va="center", color="0.4", transform=ax.transAxes)
        ax.set_title(f"{class_names[i]}: AP {100 * ap[i]:.1f}", fontsize=9)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    if shown:
        for ax in axes[-1]:
            ax.set_xlabel("recall")
        for ax in axes[:, 0]:
            ax.set_ylabel("precision")
    else:
        axes[0, 0].text(0.5, 0.5, "no class has ground truth", ha="center", va="center")
    if absent:
        listed = f": {', '.join(absent)}" if len(absent) <= MAX_NAMED else ""
        note = f"{len(absent)} of {len(class_names)} classes have no ground truth and no curve{listed}"
        fig.supxlabel(_wrap(note, fig, fontsize=9), fontsize=9)
    return fig


def confusion_matrix(confmat: Tensor, class_names: Sequence[str], title: str) -> Figure:
    """The confusion matrix ``(C, C)`` (rows true class, columns predicted), each row normalised to sum 1.

    Rows of classes absent from the targets stay empty (0). Cells are annotated when ``C <= 20``.
    The figure is sized for its class names (tick labels on both axes), cells about square.
    """
    counts = confmat.double()
    if counts.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confmat: expected shape ({len(class_names)}, {len(class_names)}), got {tuple(counts.shape)}")
    normalised = (counts / counts.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    side = 1.0 + 0.45 * len(class_names)  # the matrix, inches
    names = 0.08 * max((len(name) for name in class_names), default=1)  # tick labels, inches at 10 pt
    # With a fixed aspect the axes shrinks inside the space the layout gives it and its labels end
    # up outside the figure; "auto" fills that space, and the figure's size keeps the cells square.
    fig = Figure(figsize=(side + names + 1.8, side + names + 1.2), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
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


def segmentation_grid(
    images: Tensor, targets: Tensor, preds: Tensor, palette: Tensor, class_names: Sequence[str], ignore_index: int
) -> Figure:
    """Rows of image / ground truth / prediction, over a legend of the classes they show.

    Args:
        images: ``(N, 3, H, W)`` ``uint8`` RGB.
        targets: ``(N, H, W)`` class ids or ``ignore_index`` (drawn black).
        preds: ``(N, H, W)`` class ids.
        palette: ``(K, 3)`` ``uint8`` colors, ``K`` above every class id shown.
        class_names: the name of each class id (at least as many as the ids shown).

    The legend lists, in class order, every class in ``targets`` or ``preds`` with its colour,
    and ``ignored`` (black) when ``targets`` holds ``ignore_index``.
    """
    n, _, height, width = images.shape
    colors = torch.cat((palette.to(torch.uint8), torch.zeros(1, 3, dtype=torch.uint8)))
    ignored = targets == ignore_index
    present = torch.cat((targets[~ignored].reshape(-1).long(), preds.reshape(-1).long())).unique().tolist()
    entries = [(class_names[c], colors[c]) for c in present]
    if bool(ignored.any()):
        entries.append(("ignored", colors[-1]))
    legend_rows = math.ceil(len(entries) / _LEGEND_COLUMNS)
    fig = Figure(figsize=(3 * 3.0, n * 3.0 * height / width + 0.4 + 0.25 * legend_rows), dpi=_DPI, layout="constrained")
    axes = fig.subplots(n, 3, squeeze=False)
    for row, (image, target, pred) in enumerate(zip(images, targets, preds)):
        target = torch.where(target == ignore_index, len(palette), target.long())
        for ax, picture in zip(axes[row], (image.permute(1, 2, 0), colors[target], colors[pred.long()])):
            ax.imshow(picture.numpy())
            ax.set_axis_off()
    for ax, title in zip(axes[0], ("image", "ground truth", "prediction")):
        ax.set_title(title)
    handles = [
        Patch(facecolor=color.double().numpy() / 255, edgecolor="0.25", linewidth=0.5, label=name)
        for name, color in entries
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(_LEGEND_COLUMNS, len(handles)), fontsize=9)
    return fig


def caption_figure(figure: Figure, caption: str) -> Figure:
    """Put ``caption`` (e.g. :func:`run_caption`) above ``figure``'s own titles, wrapped to its width; returns it.

    The figure grows by the caption's height, so what it showed keeps its size.
    """
    text = _wrap(caption, figure, fontsize=_CAPTION_POINTS)
    figure.set_figheight(figure.get_figheight() + (text.count("\n") + 1) * 1.4 * _CAPTION_POINTS / 72)
    figure.suptitle(text, fontsize=_CAPTION_POINTS)
    return figure


def run_caption(model: str, weights: str | None, form: str | None) -> str:
    """What a test run evaluated: ``<model> · <file> (<form> form)``, then ``in <folder>`` on a line of its own.

    ``weights`` is the checkpoint file (or URL) the weights came from, ``None`` for none (the
    weights the model was built with); the folder is shown relative to the working directory when
    inside it, and not for a URL. ``form`` is ``train`` or ``deploy`` (see
    ``refvision.checkpoints.loading.checkpoint_form``), ``None`` when the file does not say.
    """
    if weights is None:
        return f"{model} · no checkpoint (weights as built)"
    path = Path(weights)
    shown = f"{path.name} ({_FORMS[form]} form)" if form in _FORMS else path.name
    if "://" in weights:
        return f"{model} · {shown}"
    folder = path.parent.absolute()
    if folder.is_relative_to(Path.cwd()):
        folder = folder.relative_to(Path.cwd())
    return f"{model} · {shown}\nin {folder}"


def _wrap(text: str, figure: Figure, fontsize: float) -> str:
    """``text``'s lines broken after spaces and slashes (paths) into lines that fit ``figure``'s width
    at ``fontsize`` points (a piece longer than that stays whole)."""
    chars = max(20, int(figure.get_figwidth() * 72 / (0.6 * fontsize)))
    lines = []
    for line in text.splitlines():
        current = ""
        for piece in re.split(r"(?<=[ /])", line):
            if current and len(current) + len(piece.rstrip()) > chars:
                lines.append(current.rstrip())
                current = ""
            current += piece
        lines.append(current.rstrip())
    return "\n".join(lines)


def figure_to_rgb(figure: Figure) -> np.ndarray:
    """The rendered figure as a ``(H, W, 3)`` ``uint8`` array."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG at ``path`` (folders created); returns ``path``.

    The figure's caption (:func:`caption_figure`), if any, is also the PNG's ``Title`` text entry.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    caption = figure.get_suptitle().replace("/\n", "/").replace("\n", " ")  # undoes _wrap's breaks
    figure.savefig(path, format="png", metadata={"Title": caption} if caption else None)
    return path
