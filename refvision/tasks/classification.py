"""Image classification: a torchvision or timm classifier, cross-entropy, top-1 / top-5."""

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix
from torchvision.transforms import v2

from refvision.models.classification import build_classifier
from refvision.outputs.figures import confusion_matrix
from refvision.outputs.tables import PerClassTable, confusion_table
from refvision.tasks.base import RefvisionTask
from refvision.tasks.options import Role


class ClassificationTask(RefvisionTask):
    """Fine-tune a classifier; batches are ``(images (B, 3, H, W) RGB in [0, 1], labels (B,))``.

    Args:
        backbone: torchvision model name or ``timm:<name>`` (see ``refvision.models.build_classifier``).
        num_classes: classes of the data; the command sets it from the data module.
        weights: pretrained weight name to download (``DEFAULT``, ``IMAGENET1K_V1``...), or null.
        label_smoothing: cross-entropy label smoothing.
        image_size: side of the example input used for profiling.
        mixup_alpha: MixUp's Beta(alpha, alpha) on training batches (``torchvision.transforms.v2.MixUp``); 0: off.
        cutmix_alpha: CutMix's alpha on training batches (``v2.CutMix``); 0: off. With both, each batch takes
            one of the two at random (``v2.RandomChoice``), as torchvision's reference scripts do; the loss is
            cross-entropy on the mixed soft targets, with ``label_smoothing`` applied on top of them.
        **kwargs: the shared options of :class:`~refvision.tasks.base.RefvisionTask`
            (``conv``, ``init_from``, ``init_prefix``, ``init_strict``, ``trainable``, ``optim``, ``deploy``,
            ``class_names``, ``mean``, ``std``).
    """

    monitor, monitor_mode = "val/top1", "max"
    logged_metrics = {"val": ("top1", "top5"), "test": ("top1", "top5")}

    def __init__(
        self,
        backbone: Annotated[str, Role.ARCHITECTURE] = "mobilenet_v2",
        num_classes: Annotated[int, Role.DATA] = 1000,
        weights: Annotated[str | None, Role.WEIGHTS] = None,
        label_smoothing: Annotated[float, Role.TRAINING] = 0.1,
        image_size: Annotated[int, Role.DATA_ARGUMENT] = 224,
        mixup_alpha: Annotated[float, Role.TRAINING] = 0.0,
        cutmix_alpha: Annotated[float, Role.TRAINING] = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.backbone, self.num_classes, self.weights = backbone, num_classes, weights
        self.label_smoothing, self.image_size = label_smoothing, image_size
        self.batch_mixing = batch_mixing(mixup_alpha, cutmix_alpha, num_classes)
        self.configure_model_pipeline()
        self.configure_metrics()

    def build_model(self) -> nn.Module:
        return build_classifier(self.backbone, self.num_classes, self.weights)

    def example_inputs(self) -> Tensor:
        return torch.rand(1, 3, self.image_size, self.image_size)

    def forward(self, images: Tensor) -> Tensor:
        """RGB ``(B, 3, H, W)`` in [0, 1] -> logits ``(B, num_classes)``."""
        return self.model(self.normalize(images))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        targets: Tensor = labels
        if self.batch_mixing is not None:
            images, targets = self.batch_mixing(images, labels)  # targets: (B, C) class probabilities
        loss = F.cross_entropy(self(images), targets, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        return loss

    def create_metric(self) -> MetricCollection:
        """``top1``, ``top5`` (top-min(5, C)), ``accuracy_per_class`` ``(C,)`` and ``confusion_matrix`` ``(C, C)``."""
        c = self.num_classes
        return MetricCollection(
            {
                "top1": MulticlassAccuracy(c, top_k=1),
                "top5": MulticlassAccuracy(c, top_k=min(5, c)),
                "accuracy_per_class": MulticlassAccuracy(c, top_k=1, average=None),
                "confusion_matrix": MulticlassConfusionMatrix(c),
            },
            compute_groups=False,
        )

    def evaluation_step(self, batch: tuple[Tensor, Tensor], stage: str) -> tuple[Tensor, Tensor]:
        images, labels = batch
        logits = self(images)
        self.log(f"{stage}/loss", F.cross_entropy(logits, labels), batch_size=len(labels), sync_dist=True)
        return logits, labels

    def per_class_table(self, result: dict[str, Tensor]) -> PerClassTable:
        return PerClassTable(
            tuple(self.eval_class_names()),
            {"top-1": result["accuracy_per_class"]},
            {"top-1": float(result["top1"])},
            "mean",
            "per-class accuracy (test)",
        )

    def evaluation_tables(self, result: dict[str, Tensor]) -> dict[str, PerClassTable]:
        return {"test_confusion_matrix": confusion_table(result["confusion_matrix"], self.eval_class_names())}

    def evaluation_figures(self, result: dict[str, Tensor]) -> dict[str, Figure]:
        return {
            "test_confusion_matrix": confusion_matrix(
                result["confusion_matrix"], self.eval_class_names(), "confusion matrix (test), rows normalised"
            )
        }

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """``{"classes": (B, k) int64, "probs": (B, k)}``: the ``k = min(5, num_classes)`` most
        probable classes by descending softmax probability; no labels needed."""
        probs, classes = self(self.inputs_of(batch)).softmax(dim=1).topk(min(5, self.num_classes), dim=1)
        return {"classes": classes, "probs": probs}


def batch_mixing(mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> v2.Transform | None:
    """``(images (B, 3, H, W), labels (B,)) -> (mixed images, (B, num_classes) soft targets)``: MixUp,
    CutMix or a random choice of the two for the alphas above 0; None when both are 0."""
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"model.mixup_alpha={mixup_alpha}, model.cutmix_alpha={cutmix_alpha}: expected >= 0 (0: off)")
    mixers: list[v2.Transform] = []
    if mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
