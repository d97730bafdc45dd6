"""Independent reference for segmentation scores: explicit per-class pixel counting."""

import numpy as np


def reference_scores(preds: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int) -> dict:
    """IoU per class (NaN if absent from both), mIoU, pixel accuracy, mean class accuracy."""
    valid = target != ignore_index
    iou = np.full(num_classes, np.nan)
    accuracy = np.full(num_classes, np.nan)
    for c in range(num_classes):
        is_pred = (preds == c) & valid
        is_true = (target == c) & valid
        tp = np.sum(is_pred & is_true)
        fp = np.sum(is_pred & ~is_true)
        fn = np.sum(~is_pred & is_true)
        if tp + fp + fn > 0:
            iou[c] = tp / (tp + fp + fn)
        if tp + fn > 0:
            accuracy[c] = tp / (tp + fn)
    return {
        "iou_per_class": iou,
        "miou": np.nanmean(iou),
        "pixel_accuracy": np.sum((preds == target) & valid) / np.sum(valid),
        "mean_accuracy": np.nanmean(accuracy),
    }
