"""Figures and drawn images read at their saved size: labels on filled tags, colour legends, nothing
clipped, no empty panels, no warning per empty image, and titles that say which model and checkpoint.

Each check reads the rendered pixels or matplotlib's laid-out artists, not the code's own numbers.
"""

import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from PIL import Image
from predict_process import task_checkpoint
from torchvision.io import decode_png, read_file
from torchvision.utils import draw_segmentation_masks

from refvision.app.cli import lightning_cli
from refvision.app.demo.data import write_imagefolder
from refvision.checkpoints.deploy import reparameterize_checkpoint
from refvision.data.cityscapes_labels import PALETTE, TRAIN_CLASSES
from refvision.data.predict import PredictImagesDataModule
from refvision.data.voc_format import VOC_CLASSES
from refvision.outputs.drawing import append_legend, draw_detections, font_size_for
from refvision.outputs.figures import (
    MAX_NAMED,
    caption_figure,
    confusion_matrix,
    per_class_bars,
    precision_recall_curves,
    run_caption,
    save_figure,
    segmentation_grid,
)
from refvision.outputs.writers import DetectionPredictionWriter, SegmentationPredictionWriter
from refvision.tasks.classification import ClassificationTask
from refvision.tasks.detection import DetectionTask

GREY = (128, 128, 128)


def _uniform(height: int, width: int, color: tuple[int, int, int] = GREY) -> torch.Tensor:
    return torch.tensor(color, dtype=torch.uint8).view(3, 1, 1).expand(3, height, width).contiguous()


def _is(pixels: torch.Tensor, color: tuple[int, int, int]) -> torch.Tensor:
    """``(H, W)`` bool: where ``pixels`` ``(3, H, W)`` are exactly ``color``."""
    return (pixels == torch.tensor(color, dtype=pixels.dtype).view(3, 1, 1)).all(dim=0)


def _drawn(figure: Figure) -> FigureCanvasAgg:
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return canvas


# --- detection labels ----------------------------------------------------------------------------


@pytest.mark.parametrize("color, text", [((200, 30, 30), (255, 255, 255)), ((250, 230, 60), (0, 0, 0))])
def test_detection_label_is_a_filled_tag_in_the_box_colour_with_contrasting_text(color, text) -> None:
    height, width = 375, 500  # a VOC photo's size
    image = _uniform(height, width)
    box = torch.tensor([[100.0, 150.0, 300.0, 300.0]])
    drawn = draw_detections(image, box, ["dog 0.87"], [color])
    size = font_size_for(height, width)
    assert size >= 14  # ~3 % of the long side, not torchvision's fixed ~10 px
    # The tag: a solid band of the box colour right above the box, at least the text's height.
    above = _is(drawn[:, :150], color)
    rows, columns = above.any(dim=1).nonzero().flatten(), above.any(dim=0).nonzero().flatten()
    assert len(rows) >= size and rows.max() == 149 and columns.min() == 100
    tag = drawn[:, rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
    text_columns = (~_is(tag, color)).any(dim=0)
    assert int(text_columns.sum()) > 3 * size  # "dog 0.87": several characters wide
    # Inside the tag: only the tag colour, the text colour and their blends (anti-aliasing).
    inside = tag.permute(1, 2, 0).reshape(-1, 3).double()
    tag_c, text_c = torch.tensor(color).double(), torch.tensor(text).double()
    direction = text_c - tag_c
    t = ((inside - tag_c) @ direction / direction.dot(direction)).clamp(0, 1)
    assert (inside - (tag_c + t[:, None] * direction)).abs().max() <= 2
    assert int(_is(tag, text).sum()) > size  # solid text strokes
    # The box outline in its colour, the rest of the image untouched.
    assert _is(drawn[:, 200:250, 100:102], color).all()
    assert _is(drawn[:, 200:250, 120:280], GREY).all()


def test_detection_label_stays_inside_the_image() -> None:
    image = _uniform(120, 160)
    color = (0, 90, 200)
    drawn = draw_detections(image, torch.tensor([[150.0, 0.0, 159.0, 30.0]]), ["motorbike 0.99"], [color])
    # No room above or to the right: the tag goes inside the top of the picture, moved left into it.
    tag_rows = _is(drawn, color).any(dim=1).nonzero().flatten()
    assert tag_rows.min() == 0
    columns = _is(drawn[:, : font_size_for(120, 160)], color).any(dim=0).nonzero().flatten()
    assert columns.min() < 150 - 3 * font_size_for(120, 160)


def test_no_box_returns_the_image_without_a_warning() -> None:
    image = _uniform(40, 60)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drawn = draw_detections(image, torch.zeros(0, 4), [], [])
    assert torch.equal(drawn, image)


@pytest.mark.slow
def test_detection_writer_draws_images_without_boxes_silently(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(root / name)
    task = DetectionTask(image_size=64, class_names=["__background__", *VOC_CLASSES]).eval()
    writer = DetectionPredictionWriter(str(tmp_path / "out"), score_threshold=1.01)  # no detection kept
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[writer]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.predict(task, datamodule=PredictImagesDataModule(str(root), preset="detection", batch_size=2))
    assert not [w for w in caught if "box" in str(w.message).lower()], [str(w.message) for w in caught]
    for name in ("a", "b"):
        drawn = decode_png(read_file(str(tmp_path / "out" / "boxes" / f"{name}.png")))
        assert torch.equal(drawn, decode_png(read_file(str(root / f"{name}.png"))))


# --- segmentation legends ------------------------------------------------------------------------

SATURATED = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (255, 200, 0)]


def test_overlay_has_a_legend_of_the_classes_it_shows(tmp_path: Path) -> None:
    height, width = 90, 160
    image = _uniform(height, width)
    pred = torch.zeros(height, width, dtype=torch.uint8)
    pred[:, 80:] = 2  # classes 0 and 2 shown, 1 and 3 not
    palette = torch.tensor(SATURATED, dtype=torch.uint8)
    writer = SegmentationPredictionWriter(str(tmp_path))
    overlay = writer.overlay(image, pred, palette, ["ant", "bee", "cat", "dog"])
    assert overlay.shape[0] == 3 and overlay.shape[1] > height and overlay.shape[2] == width
    blended = draw_segmentation_masks(
        image, torch.stack((pred == 0, pred == 2)), alpha=writer.alpha, colors=[SATURATED[0], SATURATED[2]]
    )
    assert torch.equal(overlay[:, :height], blended)  # the picture itself is unchanged
    band = overlay[:, height:]
    swatch = (font_size_for(height, width) - 2) ** 2
    for label, color in enumerate(SATURATED):
        count = int(_is(band, color).sum())
        assert (count >= swatch) if label in (0, 2) else count == 0, (label, count)


def test_legend_widens_a_narrow_image_to_its_longest_name() -> None:
    image = _uniform(20, 24)
    out = append_legend(image, [("motorcycle", (0, 0, 230))])
    assert out.shape[2] > 24 and torch.equal(out[:, :20, :24], image)
    assert _is(out[:, 20:], (0, 0, 230)).any()
    assert torch.equal(append_legend(image, []), image)


def test_sample_grid_legend_lists_the_classes_present() -> None:
    torch.manual_seed(0)
    images = torch.randint(0, 255, (2, 3, 16, 32), dtype=torch.uint8)
    targets = torch.full((2, 16, 32), 4)
    targets[0, :4] = 255
    targets[1, 8:] = 11
    preds = torch.full((2, 16, 32), 4, dtype=torch.uint8)
    preds[1, :, :5] = 0
    fig = segmentation_grid(images, targets, preds, torch.tensor(PALETTE, dtype=torch.uint8), TRAIN_CLASSES, 255)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["road", "fence", "person", "ignored"]
    colors = [tuple(np.round(np.asarray(h.get_facecolor()[:3]) * 255).astype(int)) for h in legend.legend_handles]
    assert colors == [PALETTE[0], PALETTE[4], PALETTE[11], (0, 0, 0)]
    _inside_figure(fig)


# --- layout --------------------------------------------------------------------------------------


def _inside_figure(fig: Figure, texts: list[Text] = ()) -> None:
    """Everything drawn lies within the figure (to half a pixel): each shown axes with its titles,
    labels and tick labels, the legends, the figure's own texts (caption, footnote) and ``texts``."""
    renderer = _drawn(fig).get_renderer()
    extents = [ax.get_tightbbox(renderer) for ax in fig.axes if ax.axison]
    extents += [legend.get_window_extent(renderer) for legend in fig.legends]
    own = {fig.get_suptitle(), fig.get_supxlabel()} - {""}
    extents += [t.get_window_extent(renderer) for t in fig.findobj(Text) if t.get_text() in own]
    extents += [text.get_window_extent(renderer) for text in texts if text.get_text()]
    box = fig.bbox
    assert len(extents) > len(texts)
    for extent in extents:
        assert (
            extent.x0 >= box.x0 - 0.5
            and extent.y0 >= box.y0 - 0.5
            and extent.x1 <= box.x1 + 0.5
            and extent.y1 <= box.y1 + 0.5
        ), (extent, box)


@pytest.mark.parametrize("names", [list(TRAIN_CLASSES), ["checker", "circle", "square", "stripes"]])
def test_confusion_matrix_labels_lie_inside_the_figure(names: list[str]) -> None:
    counts = torch.randint(0, 50, (len(names), len(names)), generator=torch.Generator().manual_seed(0))
    fig = caption_figure(confusion_matrix(counts, names, "confusion matrix (test)"), "a model · a.ckpt")
    ax = fig.axes[0]
    assert ax.yaxis.label.get_text() == "true"
    _inside_figure(fig, [ax.yaxis.label, ax.xaxis.label])


def test_pr_curves_draw_only_classes_with_ground_truth() -> None:
    names = list(VOC_CLASSES)
    ap = torch.full((20,), float("nan"), dtype=torch.float64)
    curves = [torch.empty(2, 0, dtype=torch.float64) for _ in names]
    for c in (4, 6, 7, 14):
        ap[c] = 0.25 * (c % 4)
        curves[c] = torch.tensor([[0.2, 0.5], [1.0, 0.5]], dtype=torch.float64)
    fig = precision_recall_curves(curves, names, ap)
    shown = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title().split(":")[0] for ax in shown] == ["bottle", "car", "cat", "person"]
    assert all(ax.lines for ax in shown)
    texts = [t.get_text() for t in fig.findobj(Text)]
    assert "16 of 20 classes have no ground truth and no curve" in texts  # 16 > MAX_NAMED: counted, not named
    _inside_figure(fig)
    # Few without ground truth: named.
    few = torch.full((20,), 0.5, dtype=torch.float64)
    few[[1, 19]] = float("nan")
    fig = precision_recall_curves(curves, names, few)
    assert len([ax for ax in fig.axes if ax.axison]) == 18
    texts = [t.get_text() for t in fig.findobj(Text)]
    assert "2 of 20 classes have no ground truth and no curve: bicycle, tvmonitor" in texts
    assert 2 <= MAX_NAMED < 16


def test_pr_panel_of_a_class_without_detections_says_so() -> None:
    ap = torch.tensor([float("nan"), 0.0], dtype=torch.float64)  # b has ground truth, nothing found
    fig = precision_recall_curves([torch.empty(2, 0)] * 2, ["a", "b"], ap)
    (panel,) = [ax for ax in fig.axes if ax.axison]
    assert panel.get_title() == "b: AP 0.0"
    assert not panel.lines and [t.get_text() for t in panel.texts] == ["no detections"]


def test_pr_curves_without_any_ground_truth_say_so() -> None:
    nan = torch.full((3,), float("nan"), dtype=torch.float64)
    fig = precision_recall_curves([torch.empty(2, 0)] * 3, ["a", "b", "c"], nan)
    assert not [ax for ax in fig.axes if ax.axison]
    texts = [t.get_text() for t in fig.findobj(Text)]
    assert "no class has ground truth" in texts and "3 of 3 classes have no ground truth and no curve: a, b, c" in texts


# --- titles --------------------------------------------------------------------------------------


def test_run_caption_names_model_file_form_and_folder(tmp_path: Path) -> None:
    ckpt = tmp_path / "refconv" / "checkpoints" / "best-deploy.ckpt"
    caption = run_caption("SSD (ssdlite320_mobilenet_v3_large)", str(ckpt), "deploy")
    assert caption == f"SSD (ssdlite320_mobilenet_v3_large) · best-deploy.ckpt (deploy form)\nin {ckpt.parent}"
    assert run_caption("M", "https://host/w/best.ckpt", "train") == "M · best.ckpt (training form)"
    assert run_caption("M", None, None) == "M · no checkpoint (weights as built)"
    fig = caption_figure(per_class_bars(["a"], torch.tensor([0.5]), "AP", "AP"), caption)
    path = save_figure(fig, tmp_path / "f.png")
    assert Image.open(path).text["Title"] == caption.replace("\n", " ")


@pytest.mark.slow
@pytest.mark.parametrize("form", ["train", "deploy"])
def test_test_run_figures_are_titled_with_model_and_checkpoint(tmp_path: Path, form: str) -> None:
    data = write_imagefolder(tmp_path / "images", train_per_class=1, val_per_class=2, size=32)
    task = ClassificationTask(
        backbone="resnet18",  # the demo config's
        num_classes=4,
        class_names=["checker", "circle", "square", "stripes"],
        image_size=32,
        conv={"kind": "refconv"},
    )
    ckpt = task_checkpoint(task, tmp_path / "refocused.ckpt")
    if form == "deploy":
        ckpt = Path(reparameterize_checkpoint(ckpt, tmp_path / "refocused-deploy.ckpt").output)
    cli = lightning_cli(
        [
            "test",
            "-c",
            "configs/demo/classification.yaml",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.accelerator",
            "cpu",
            "--data.root",
            str(data),
            "--data.image_size",
            "32",
            "--data.resize_size",
            "32",
            "--data.batch_size",
            "4",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--ckpt_path",
            str(ckpt),
        ]
    )
    title = Image.open(Path(cli.trainer.log_dir) / "test_confusion_matrix.png").text["Title"]
    model = "ResNet (resnet18, conv refconv)" if form == "train" else "ResNet (resnet18)"
    label = "training" if form == "train" else "deploy"
    assert title == f"{model} · {ckpt.name} ({label} form) in {tmp_path}", title
