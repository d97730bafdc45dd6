"""Evaluation metrics: Pascal VOC / COCO detection mAP and segmentation mIoU."""

from refvision.metrics.miou import MeanIoU
from refvision.metrics.table import format_table
from refvision.metrics.voc_map import VOCMeanAveragePrecision

__all__ = ["MeanIoU", "VOCMeanAveragePrecision", "format_table"]
