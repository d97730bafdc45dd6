"""Dataset readers, transform presets, DataModules and demo-data writers."""

from refvision.data.cityscapes import CityscapesDataModule, CityscapesSegmentation
from refvision.data.demo import ensure_demo_data, write_cityscapes, write_imagefolder, write_vocdevkit
from refvision.data.imagefolder import ImageFolderDataModule
from refvision.data.predict import PredictImagesDataModule
from refvision.data.voc import VOCDataModule, VOCDetection, detection_collate

__all__ = [
    "CityscapesDataModule",
    "CityscapesSegmentation",
    "ImageFolderDataModule",
    "PredictImagesDataModule",
    "VOCDataModule",
    "VOCDetection",
    "detection_collate",
    "ensure_demo_data",
    "write_cityscapes",
    "write_imagefolder",
    "write_vocdevkit",
]
