"""Dataset readers, transform presets and DataModules (the demo-data writers live in ``refvision.app.demo.data``)."""

from refvision.data.cityscapes import CityscapesDataModule, CityscapesSegmentation
from refvision.data.coco import CocoDetection, CocoDetectionDataModule
from refvision.data.description import DataDescription, DescribedDataModule, Statistics
from refvision.data.imagefolder import ImageFolderDataModule
from refvision.data.predict import PredictImagesDataModule
from refvision.data.voc import VOCDataModule, VOCDetection, detection_collate

__all__ = [
    "CityscapesDataModule",
    "CityscapesSegmentation",
    "CocoDetection",
    "CocoDetectionDataModule",
    "DataDescription",
    "DescribedDataModule",
    "ImageFolderDataModule",
    "PredictImagesDataModule",
    "Statistics",
    "VOCDataModule",
    "VOCDetection",
    "detection_collate",
]
