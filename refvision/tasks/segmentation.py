"""Semantic segmentation: DeepLabV3+ (smp), cross-entropy (optionally OHEM), confusion-matrix mIoU.

Validation and test score full label-resolution logits produced by MMSegmentation's inference
modes: ``whole`` (the padded image in one pass) or ``slide`` (overlapping windows, logits
averaged where they overlap), optionally with horizontal-flip and multi-scale test-time
augmentation. ``refvision.outputs.writers.SegmentationPredictionWriter`` writes the predictions as PNGs.
"""

from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn

from refvision.metrics import MeanIoU
from refvision.models.losses import ohem_cross_entropy
from refvision.models.segmentation import build_segmenter
from refvision.models.segmentation_inference import segment, whole_inference
from refvision.outputs.figures import confusion_matrix, per_class_bars, segmentation_grid
from refvision.outputs.tables import PerClassTable, confusion_table
from refvision.tasks.base import RefvisionTask
from refvision.tasks.options import Role
from refvision.utils.colors import label_color

OHEM_THRESH = 0.7
OHEM_MIN_KEPT = 100_000
OHEM_MIN_KEPT_PIXELS = 512 * 1024
"""MMSeg's OHEM setting: pixels whose true-class probability is below 0.7 are kept, and at least
100 000 per 512x1024 crop; ``min_kept`` scales with the crop area so smaller crops keep the same share."""

InferenceMode = Literal["whole", "slide"]


class SegmentationTask(RefvisionTask):
    """Train and evaluate a DeepLabV3+ segmenter.

    Batches are ``(images (B, 3, H, W) float RGB in [0, 1], masks (B, H, W) int64)`` with class ids
    ``0..num_classes-1`` and ``ignore_index`` (as :class:`~refvision.data.CityscapesDataModule`
    gives). Training crops must have H, W divisible by the encoder's output stride.

    Args:
        encoder: smp encoder name or ``tu-<timm name>`` (see ``refvision.models.build_segmenter``).
        num_classes: classes of the data (at most 255, as predictions are stored as ``uint8``
            train-id maps); the command sets it from the data module.
        encoder_weights: smp pretrained encoder tag (``imagenet``) to download, or null.
        output_stride: 8 or 16; the encoder's last stages become dilated convs.
        ignore_index: mask value left out of the loss and the metrics (255, the Cityscapes / MMSegmentation
            convention); the command sets it from the data module where it has one.
        ohem: cross-entropy over hard pixels only (see ``refvision.models.losses.ohem_cross_entropy``).
        inference: ``whole`` or ``slide`` (see ``refvision.models.segmentation_inference.segment``), for
            validation, test and predict.
        slide_crop: window (h, w) of ``slide`` inference.
        slide_stride: window step (h, w) of ``slide`` inference.
        flip: average with the horizontally flipped input at evaluation.
        scales: evaluation scales (multi-scale test-time augmentation when not ``[1.0]``).
        example_size: (h, w) of the example input used for profiling and deploy checks.
        palette: RGB colour ``[r, g, b]`` (0..255) of each class in figures and prediction images;
            set from the data module; null: well-spread colours.
        **kwargs: the shared options of :class:`~refvision.tasks.base.RefvisionTask`
            (``conv``, ``init_from``, ``init_prefix``, ``init_strict``, ``trainable``, ``optim``, ``deploy``,
            ``class_names``, ``mean``, ``std``).
    """

    default_conv_include = ["encoder.*"]
    monitor, monitor_mode = "val/miou", "max"
    logged_metrics = {"val": ("miou", "pixel_accuracy"), "test": ("miou", "pixel_accuracy", "mean_accuracy")}
    figure_samples = 4
    """Test images shown in the image / ground truth / prediction figure (the first ones of rank 0)."""

    def __init__(
        self,
        encoder: Annotated[str, Role.ARCHITECTURE] = "mobilenet_v2",
        num_classes: Annotated[int, Role.DATA] = 19,
        encoder_weights: Annotated[str | None, Role.WEIGHTS] = None,
        output_stride: Annotated[int, Role.ARCHITECTURE] = 8,
        ignore_index: Annotated[int, Role.DATA] = 255,
        ohem: Annotated[bool, Role.TRAINING] = False,
        inference: Annotated[InferenceMode, Role.RUN] = "whole",
        slide_crop: Annotated[tuple[int, int], Role.RUN] = (512, 1024),
        slide_stride: Annotated[tuple[int, int], Role.RUN] = (341, 683),
        flip: Annotated[bool, Role.RUN] = False,
        scales: Annotated[tuple[float, ...], Role.RUN] = (1.0,),
        example_size: Annotated[tuple[int, int], Role.TRAINING] = (512, 1024),
        palette: Annotated[list[tuple[int, int, int]] | None, Role.DATA] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        if not 1 <= num_classes <= 255:
            raise ValueError(f"model.num_classes={num_classes}; expected 1..255 (predictions are uint8 train-id maps)")
        if inference not in ("whole", "slide"):
            raise ValueError(f"model.inference={inference!r}; allowed: whole, slide")
        self.encoder, self.num_classes, self.encoder_weights = encoder, num_classes, encoder_weights
        self.output_stride, self.ignore_index, self.ohem = output_stride, ignore_index, ohem
        self.inference, self.slide_crop, self.slide_stride = inference, tuple(slide_crop), tuple(slide_stride)
        self.flip, self.scales, self.example_size = flip, tuple(scales), tuple(example_size)
        if palette is not None and len(palette) != num_classes:
            raise ValueError(f"model.palette has {len(palette)} colours but model.num_classes={num_classes}")
        colors = palette if palette is not None else [label_color(c) for c in range(num_classes)]
        self.palette = torch.tensor(colors, dtype=torch.uint8).reshape(-1, 3)
        """``(num_classes, 3) uint8``: the colour of each class."""
        self.configure_model_pipeline()
        self.configure_metrics()
        self._samples: list[tuple[Tensor, Tensor, Tensor]] = []

    def build_model(self) -> nn.Module:
        return build_segmenter(self.encoder, self.num_classes, self.encoder_weights, self.output_stride)

    def raw_forward(self, model: nn.Module, inputs: Tensor) -> Tensor:
        """Logits ``(B, C, H, W)`` of ``model`` on ``(B, 3, H, W)`` in [0, 1], normalised and padded
        to multiples of 16 inside."""
        return whole_inference(model, self.normalize(inputs))

    def inputs_of(self, batch: Any) -> Tensor:
        return batch if isinstance(batch, Tensor) else batch[0]

    def example_inputs(self) -> Tensor:
        return torch.rand(1, 3, *self.example_size)

    def forward(self, images: Tensor) -> Tensor:
        """RGB ``(B, 3, H, W)`` in [0, 1] -> class scores ``(B, C, H, W)`` with the configured inference."""
        return segment(
            self.model,
            self.normalize(images),
            self.num_classes,
            self.inference,
            self.slide_crop,
            self.slide_stride,
            self.flip,
            self.scales,
        )

    def loss(self, logits: Tensor, masks: Tensor) -> Tensor:
        """Cross-entropy (OHEM when ``ohem``) of logits ``(B, C, H, W)`` against masks ``(B, H, W)``."""
        if self.ohem:
            per_image = max(1, round(OHEM_MIN_KEPT * masks[0].numel() / OHEM_MIN_KEPT_PIXELS))
            return ohem_cross_entropy(logits, masks, self.ignore_index, OHEM_THRESH, per_image * len(masks))
        return F.cross_entropy(logits, masks, ignore_index=self.ignore_index)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, masks = batch
        loss = self.loss(self.model(self.normalize(images)), masks)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(masks))
        return loss

    def create_metric(self) -> MeanIoU:
        return MeanIoU(self.num_classes, self.ignore_index)

    def evaluation_step(self, batch: tuple[Tensor, Tensor], stage: str) -> tuple[Tensor, Tensor]:
        images, masks = batch
        logits = self(images)
        if stage == "test" and len(self._samples) < self.figure_samples:
            keep = self.figure_samples - len(self._samples)
            preds = logits[:keep].argmax(dim=1).to(torch.uint8)
            self._samples += zip(to_rgb(images[:keep]).cpu(), masks[:keep].cpu(), preds.cpu())
        return logits, masks

    def on_test_epoch_start(self) -> None:
        self._samples = []

    def per_class_table(self, result: dict[str, Any]) -> PerClassTable:
        columns = {"IoU": result["iou_per_class"], "accuracy": result["accuracy_per_class"]}
        means = {"IoU": float(result["miou"]), "accuracy": float(result["mean_accuracy"])}
        return PerClassTable(
            tuple(self.eval_class_names()), columns, means, "mean", "per-class IoU and accuracy (test)"
        )

    def evaluation_tables(self, result: dict[str, Any]) -> dict[str, PerClassTable]:
        return {"test_confusion_matrix": confusion_table(result["confusion_matrix"], self.eval_class_names())}

    def evaluation_figures(self, result: dict[str, Any]) -> dict[str, Figure]:
        names = self.eval_class_names()
        figures = {
            "test_iou_per_class": per_class_bars(names, result["iou_per_class"], "IoU per class (test)", "IoU"),
            "test_confusion_matrix": confusion_matrix(
                result["confusion_matrix"], names, "confusion matrix (test), rows normalised"
            ),
        }
        if self._samples:
            images, masks, preds = (torch.stack(part) for part in zip(*self._samples))
            figures["test_samples"] = segmentation_grid(images, masks, preds, self.palette, names, self.ignore_index)
        self._samples = []
        return figures

    def predict_step(self, batch: Any, batch_idx: int) -> list[Tensor]:
        """Predicted class-id maps ``(H_i, W_i)`` ``uint8``, one per image at its input resolution.

        The images are a ``(B, 3, H, W)`` batch or a list of ``(3, H_i, W_i)`` of any sizes (each
        then goes through the configured inference on its own).
        """
        images = self.inputs_of(batch)
        if isinstance(images, Tensor):
            return list(self(images).argmax(dim=1).to(torch.uint8))
        return [self(image.unsqueeze(0)).argmax(dim=1)[0].to(torch.uint8) for image in images]


def to_rgb(images: Tensor) -> Tensor:
    """``uint8 (B, 3, H, W)`` RGB of the model inputs ``(B, 3, H, W)`` in [0, 1]."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
