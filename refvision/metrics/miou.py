"""Confusion-matrix mean IoU for semantic segmentation (Cityscapes-style evaluation)."""

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


class MeanIoU(Metric):
    """Mean intersection over union from a confusion matrix summed over all pixels seen.

    Args:
        num_classes: number of classes ``C``; class ids run ``0..C-1``.
        ignore_index: target value of pixels left out of the evaluation (Cityscapes: 255).
            Predictions are never ignored.
        class_names: one name per class, kept for :func:`~refvision.metrics.format_table`.
        kwargs: passed to :class:`torchmetrics.Metric`.

    State: ``confmat`` ``(C, C)`` int64, rows the target class, columns the predicted one,
    reduced across processes by summation.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    confmat: Tensor

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index: expected a value outside the class ids 0..{num_classes - 1}, got {ignore_index}"
            )
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names: expected {num_classes} names, got {len(class_names)}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = tuple(class_names) if class_names is not None else None
        self.add_state(
            "confmat",
            default=torch.zeros(num_classes, num_classes, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch.

        Args:
            preds: ``(B, H, W)`` integer class ids in ``0..C-1``, or ``(B, C, H, W)`` logits or
                probabilities (the class is the argmax over ``C``).
            target: ``(B, H, W)`` integer class ids in ``0..C-1`` or ``ignore_index``.

        Raises:
            ValueError: on a shape mismatch or a value outside the expected range, naming it.
        """
        c = self.num_classes
        if target.ndim != 3 or target.is_floating_point():
            raise ValueError(
                f"target: expected an integer tensor of shape (B, H, W), got {target.dtype} "
                f"of shape {tuple(target.shape)}"
            )
        if preds.ndim == 4:
            if preds.shape[1] != c:
                raise ValueError(
                    f"preds: expected (B, {c}, H, W) scores for {c} classes, got shape {tuple(preds.shape)}"
                )
            preds = preds.argmax(dim=1)
        elif preds.ndim != 3 or preds.is_floating_point():
            raise ValueError(
                f"preds: expected integer class ids (B, H, W) or scores (B, {c}, H, W), got "
                f"{preds.dtype} of shape {tuple(preds.shape)}"
            )
        if preds.shape != target.shape:
            raise ValueError(
                f"preds, target: expected the same (B, H, W), got {tuple(preds.shape)} and {tuple(target.shape)}"
            )
        _check_range(preds, "preds", c)
        kept = target != self.ignore_index
        _check_range(target[kept], "target", c, f" or ignore_index {self.ignore_index}")
        pairs = target[kept].long() * c + preds[kept].long()
        self.confmat += _count(pairs, c * c).view(c, c)

    def compute(self) -> dict[str, Tensor]:
        """Scores from the accumulated confusion matrix.

        Returns:
            CPU float64 tensors: ``iou_per_class`` ``(C,)``, NaN for a class absent from both
            prediction and target (union 0); ``miou``, the mean over the other classes;
            ``pixel_accuracy`` over all non-ignored pixels; ``mean_accuracy``, the mean of
            per-class recall over classes present in the target. NaN where nothing counts.
            Also ``accuracy_per_class`` ``(C,)`` (that recall, NaN for a class absent from the
            target) and ``confusion_matrix``, the summed ``(C, C)`` int64 state.
        """
        confmat = self.confmat.cpu().double()
        hits = confmat.diagonal()
        target_count = confmat.sum(dim=1)
        union = target_count + confmat.sum(dim=0) - hits
        iou = hits / union  # 0 / 0 = NaN: class absent from both
        class_accuracy = hits / target_count
        return {
            "miou": iou.nanmean(),
            "iou_per_class": iou,
            "pixel_accuracy": hits.sum() / confmat.sum(),
            "mean_accuracy": class_accuracy.nanmean(),
            "accuracy_per_class": class_accuracy,
            "confusion_matrix": self.confmat.cpu().clone(),
        }


def _check_range(values: Tensor, name: str, num_classes: int, alternative: str = "") -> None:
    if values.numel() == 0:
        return
    low, high = values.min().item(), values.max().item()
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(f"{name}: expected class ids in 0..{num_classes - 1}{alternative}, got {bad}")


def _count(index: Tensor, size: int) -> Tensor:
    """``torch.bincount(index, minlength=size)``, deterministic when torch is asked to be."""
    if torch.are_deterministic_algorithms_enabled():
        # bincount has no deterministic CUDA kernel; accumulating index_put_ does.
        counts = torch.zeros(size, dtype=torch.long, device=index.device)
        return counts.index_put_((index,), torch.ones_like(index), accumulate=True)
    return torch.bincount(index, minlength=size)
