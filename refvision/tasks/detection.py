"""Object detection: torchvision SSD / SSDLite, SSD's multibox loss, Pascal VOC mAP@0.5 or pycocotools' COCOeval.

Batches are ``(images, targets)`` as :class:`~refvision.data.VOCDataModule` and
:class:`~refvision.data.CocoDetectionDataModule` give them:
``images[i]`` a ``(3, H_i, W_i)`` float tensor in [0, 1] and ``targets[i]`` a dict with
``boxes`` ``(N, 4)`` xyxy (0-based continuous pixels), ``labels`` ``(N,)`` int64 in
``1..num_classes - 1``, and ``image_id``, with what the metric of the data's ``protocol`` reads
(VOC: ``difficult``; COCO: see :class:`~refvision.metrics.COCOMeanAveragePrecision`). The detector
resizes and normalizes internally and maps its detections back to each input image's pixels.
"""

from collections.abc import Sequence
from dataclasses import replace
from typing import Annotated, Any, Literal

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from refvision.metrics import COCO_STATS, COCOMeanAveragePrecision, VOCMeanAveragePrecision
from refvision.models.detection import SSDRawOutputs, build_detector, ssd_raw_outputs
from refvision.outputs.figures import per_class_bars, precision_recall_curves
from refvision.outputs.tables import PerClassTable, per_class_table
from refvision.tasks.base import RefvisionTask
from refvision.tasks.options import Role

Detection = dict[str, Any]
"""One image's detections: ``boxes`` ``(D, 4)`` xyxy in input pixels, ``scores`` ``(D,)``,
``labels`` ``(D,)`` int64 (0 is background, never predicted)."""


class DetectionTask(RefvisionTask):
    """Train and evaluate an SSD detector (see the module docstring for the batch format).

    Args:
        detector: ``ssd300_vgg16``, ``ssdlite320_mobilenet_v3_large`` or ``ssdlite320_mobilenet_v2``
            (see ``refvision.models.build_detector``).
        num_classes: classes including the background (21 for VOC); the command sets it from the data module.
        weights_backbone: torchvision ImageNet weight name of the backbone to download
            (``DEFAULT``, ``IMAGENET1K_V1``, ``IMAGENET1K_FEATURES`` for VGG16), or null.
        image_size: square side the SSDLite models resize to (default 320; SSD300 only takes 300); the
            command sets it from ``data.image_size``.
        eval_mode: VOC AP interpolation: ``11points`` (VOC2007, the SSD paper) or ``area`` (VOC2010+).
        norm_momentum: BatchNorm running-statistics momentum of every norm layer, or null to keep
            the detector's (SSDLite: 0.03, set for torchvision's 660-epoch schedule; with a few
            hundred steps such slow statistics lag far behind the weights and spoil evaluation).
        **kwargs: the shared options of :class:`~refvision.tasks.base.RefvisionTask`
            (``conv``, ``init_from``, ``init_prefix``, ``init_strict``, ``trainable``, ``optim``, ``deploy``,
            ``class_names`` (background first)).
        mean: per-channel RGB mean the detector's transform normalises with, or null for the
            detector's own (SSDLite 0.5, SSD300 VGG16's Caffe mean); set from the data module.
        std: per-channel RGB standard deviation, as ``mean`` (SSDLite 0.5, SSD300 1 / 255).
        protocol: how the data is evaluated: ``voc`` (the devkit's mAP@0.5 by ``eval_mode``, with COCO's
            mAP@[.5:.95] alongside) or ``coco`` (pycocotools' ``COCOeval``: ``map`` is AP@[.5:.95], and
            ``map_50`` ... ``mar_large`` its other numbers); set from the data module.
        category_ids: the data's category id of each label ``1..num_classes - 1``, which ``coco``
            evaluation reports in; set from the data module.

    By default only the backbone's feature layers are converted (``conv.include`` widens it, e.g.
    ``[backbone.*]`` adds the extra layers, ``[head.*]`` the prediction heads).
    """

    num_classes_note = " (background included)"
    default_conv_include = ["backbone.features.*"]
    monitor, monitor_mode = "val/map", "max"

    def __init__(
        self,
        detector: Annotated[str, Role.ARCHITECTURE] = "ssdlite320_mobilenet_v3_large",
        num_classes: Annotated[int, Role.DATA] = 21,
        weights_backbone: Annotated[str | None, Role.WEIGHTS] = None,
        image_size: Annotated[int | None, Role.DATA_ARGUMENT] = None,
        eval_mode: Annotated[Literal["11points", "area"], Role.RUN] = "11points",
        norm_momentum: Annotated[float | None, Role.TRAINING] = None,
        mean: Annotated[tuple[float, float, float] | None, Role.DATA] = None,
        std: Annotated[tuple[float, float, float] | None, Role.DATA] = None,
        protocol: Annotated[Literal["voc", "coco"], Role.DATA] = "voc",
        category_ids: Annotated[list[int] | None, Role.DATA] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(mean=mean, std=std, **kwargs)
        self.save_hyperparameters()
        if num_classes < 2:
            raise ValueError(f"model.num_classes={num_classes}; expected at least 2 (the background included)")
        if norm_momentum is not None and not 0 < norm_momentum <= 1:
            raise ValueError(f"model.norm_momentum={norm_momentum}; expected a value in (0, 1] or null")
        if protocol == "coco" and (category_ids is None or len(category_ids) != num_classes - 1):
            given = "none" if category_ids is None else f"{len(category_ids)}"
            raise ValueError(
                f"model.protocol=coco needs model.category_ids, one per class after the background "
                f"({num_classes - 1}); got {given} (the data module sets both)"
            )
        self.protocol = protocol
        self.category_ids = list(category_ids) if category_ids is not None else None
        self.detector, self.num_classes, self.weights_backbone = detector, num_classes, weights_backbone
        self.image_size, self.eval_mode, self.norm_momentum = image_size, eval_mode, norm_momentum
        self.configure_model_pipeline()
        self.configure_metrics()

    def build_model(self) -> nn.Module:
        model = build_detector(self.detector, self.num_classes, self.weights_backbone, self.image_size)
        if self.mean is not None and self.std is not None:
            model.transform.image_mean, model.transform.image_std = list(self.mean), list(self.std)
        if self.norm_momentum is not None:
            for module in model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.momentum = self.norm_momentum
        return model

    def raw_forward(self, model: nn.Module, inputs: Sequence[Tensor] | Tensor) -> Tensor:
        """Pre-NMS outputs ``(B, A * (4 + C))``; see :func:`ssd_raw_outputs`."""
        return ssd_raw_outputs(model, inputs)

    def profile_module(self) -> nn.Module:
        return SSDRawOutputs(self.model)

    def example_inputs(self) -> list[Tensor]:
        """One ``(3, S, S)`` image at the model's input size ``S``."""
        height, width = self.model.transform.fixed_size
        return [torch.rand(3, height, width)]

    def forward(self, images: Sequence[Tensor]) -> list[Detection]:
        """Detections per image, boxes in each input image's pixels (the model must be in eval mode)."""
        return self.model(list(images))

    def training_step(self, batch: tuple[list[Tensor], list[dict[str, Any]]], batch_idx: int) -> Tensor:
        images, targets = batch
        losses = self.model(images, targets)
        loss = sum(losses.values())
        batch_size = len(images)
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        return loss

    @property
    def logged_metrics(self) -> dict[str, tuple[str, ...]]:  # type: ignore[override]
        """VOC: ``map`` (the devkit's) and COCO's ``coco_map`` (+ ``coco_map_50`` at test); COCO: ``map`` and
        ``map_50``, at test every number of ``COCOeval.stats``."""
        if self.protocol == "coco":
            return {"val": ("map", "map_50"), "test": COCO_STATS}
        return {"val": ("map", "coco_map"), "test": ("map", "coco_map", "coco_map_50")}

    def create_metric(self) -> VOCMeanAveragePrecision | COCOMeanAveragePrecision:
        if self.protocol == "coco":
            return COCOMeanAveragePrecision(self.category_ids or [])
        return VOCMeanAveragePrecision(self.num_classes - 1, eval_mode=self.eval_mode)

    def evaluation_step(
        self, batch: tuple[list[Tensor], list[dict[str, Any]]], stage: str
    ) -> tuple[list[Detection], list[dict[str, Any]]]:
        images, targets = batch
        return self(images), targets

    def eval_class_names(self) -> list[str]:
        """Names of the foreground labels ``1..num_classes - 1`` (the rows of the per-class results)."""
        return super().eval_class_names()[1:]

    def per_class_table(self, result: dict[str, Any]) -> PerClassTable:
        return replace(per_class_table(result, self.eval_class_names()), title=f"per-class {self._ap_name()}")

    def evaluation_figures(self, result: dict[str, Any]) -> dict[str, Figure]:
        names = self.eval_class_names()
        # COCO's curves are at IoU 0.5: their panels give the AP@.5 they average to.
        curve_ap = result["ap50_per_class"] if self.protocol == "coco" else result["ap_per_class"]
        return {
            "test_ap_per_class": per_class_bars(names, result["ap_per_class"], self._ap_name(), "AP"),
            "test_pr_curves": precision_recall_curves(result["pr_curves"], names, curve_ap),
        }

    def _ap_name(self) -> str:
        if self.protocol == "coco":
            return "AP@[.5:.95] (COCOeval, test)"
        return f"AP@{self.eval_metrics['test'].iou_threshold} ({self.eval_mode}, test)"

    def predict_step(self, batch: tuple[list[Tensor], list[dict[str, Any]]], batch_idx: int) -> list[Detection]:
        """Detections per image (see :data:`Detection`), in the batch's order; no labels needed."""
        return self(self.inputs_of(batch))
