"""Evaluation metrics: Pascal VOC / COCO detection mAP and segmentation mIoU."""

from refvision.metrics.coco_map import COCO_STATS, COCOMeanAveragePrecision
from refvision.metrics.miou import MeanIoU
from refvision.metrics.voc_map import VOCMeanAveragePrecision

__all__ = ["COCO_STATS", "COCOMeanAveragePrecision", "MeanIoU", "VOCMeanAveragePrecision"]
