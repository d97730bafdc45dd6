"""Prediction writers: ``refvision predict`` outputs named after the input files, in the formats evaluators read."""

from refvision.engine.writers.classification import ClassificationPredictionWriter
from refvision.engine.writers.detection import DetectionPredictionWriter
from refvision.engine.writers.segmentation import SegmentationPredictionWriter

__all__ = ["ClassificationPredictionWriter", "DetectionPredictionWriter", "SegmentationPredictionWriter"]
