"""Evaluation metrics: Pascal VOC / COCO detection mAP and segmentation mIoU."""

from refvision.metrics.miou import MeanIoU
from refvision.metrics.voc_map import VOCMeanAveragePrecision

__all__ = ["MeanIoU", "VOCMeanAveragePrecision"]
