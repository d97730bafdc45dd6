"""Prediction writers: ``refvision predict`` outputs named after the input files, in the formats evaluators read."""

from refvision.writers.classification import ClassificationPredictionWriter
from refvision.writers.detection import DetectionPredictionWriter
from refvision.writers.segmentation import SegmentationPredictionWriter

__all__ = ["ClassificationPredictionWriter", "DetectionPredictionWriter", "SegmentationPredictionWriter"]
