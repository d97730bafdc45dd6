"""Model builders: classifiers (torchvision / timm), SSD detectors, DeepLabV3+ segmenters."""

from refvision.models.classification import build_classifier
from refvision.models.detection import build_detector
from refvision.models.segmentation import build_segmenter
from refvision.models.weights import WeightsUnavailableError

__all__ = ["build_classifier", "build_detector", "build_segmenter", "WeightsUnavailableError"]
