"""Prediction writers: ``refvision predict`` outputs named after the input files, in the formats evaluators read."""

from refvision.outputs.writers.classification import ClassificationPredictionWriter
from refvision.outputs.writers.detection import DetectionPredictionWriter
from refvision.outputs.writers.segmentation import SegmentationPredictionWriter

__all__ = ["ClassificationPredictionWriter", "DetectionPredictionWriter", "SegmentationPredictionWriter"]
