"""Image classification: a torchvision or timm classifier, cross-entropy, top-1 / top-5."""

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from refvision.models.classification import build_classifier
from refvision.tasks.base import RefvisionTask


class ClassificationTask(RefvisionTask):
    """Fine-tune a classifier; batches are ``(images (B, 3, H, W) normalized, labels (B,))``.

    Args:
        backbone: torchvision model name or ``timm:<name>`` (see ``refvision.models.build_classifier``).
        num_classes: classes of the data (must equal the data module's).
        weights: pretrained weight name to download (``DEFAULT``, ``IMAGENET1K_V1``...), or null.
        label_smoothing: cross-entropy label smoothing.
        image_size: side of the example input used for profiling.
        **kwargs: the shared options of :class:`~refvision.tasks.base.RefvisionTask`
            (``conv``, ``init_from``, ``init_prefix``, ``init_strict``, ``trainable``, ``optim``, ``deploy``).
    """

    download_options = ("weights",)
    monitor, monitor_mode = "val/top1", "max"

    def __init__(
        self,
        backbone: str = "mobilenet_v2",
        num_classes: int = 1000,
        weights: str | None = None,
        label_smoothing: float = 0.1,
        image_size: int = 224,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.backbone, self.num_classes, self.weights = backbone, num_classes, weights
        self.label_smoothing, self.image_size = label_smoothing, image_size
        self.configure_model_pipeline()
        top_k = min(5, num_classes)
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1)
        self.val_top5 = MulticlassAccuracy(num_classes, top_k=top_k)
        self.test_top1 = MulticlassAccuracy(num_classes, top_k=1)
        self.test_top5 = MulticlassAccuracy(num_classes, top_k=top_k)
        self.test_per_class = MulticlassAccuracy(num_classes, top_k=1, average=None)

    def build_model(self) -> nn.Module:
        return build_classifier(self.backbone, self.num_classes, self.weights)

    def example_inputs(self) -> Tensor:
        return torch.randn(1, 3, self.image_size, self.image_size)

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> logits ``(B, num_classes)``."""
        return self.model(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels, label_smoothing=self.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_top1(logits, labels)
        self.val_top5(logits, labels)
        self.log("val/loss", F.cross_entropy(logits, labels), batch_size=len(labels), sync_dist=True)
        self.log("val/top1", self.val_top1, prog_bar=True)
        self.log("val/top5", self.val_top5)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.test_top1(logits, labels)
        self.test_top5(logits, labels)
        self.test_per_class.update(logits, labels)
        self.log("test/top1", self.test_top1)
        self.log("test/top5", self.test_top5)

    def on_test_epoch_end(self) -> None:
        per_class = self.test_per_class.compute()
        self.test_per_class.reset()
        names = getattr(self.trainer.datamodule, "class_names", None) or [str(i) for i in range(self.num_classes)]
        width = max(len(n) for n in names)
        lines = [f"{'class':<{width}}  top-1"] + [f"{n:<{width}}  {100 * a:6.2f}" for n, a in zip(names, per_class.tolist())]
        rank_zero_info("per-class accuracy (test):\n" + "\n".join(lines))

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """``{"classes": (B, k) int64, "probs": (B, k)}``: the ``k = min(5, num_classes)`` most
        probable classes by descending softmax probability; no labels needed."""
        probs, classes = self(self.inputs_of(batch)).softmax(dim=1).topk(min(5, self.num_classes), dim=1)
        return {"classes": classes, "probs": probs}
