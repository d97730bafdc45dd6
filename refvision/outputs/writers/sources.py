"""Which file each predicted sample came from, for the data sets refvision reads.

Writers name their outputs after the input file, never by dataset index; this module is the
one place that knows where each data set keeps its file list.
"""

from pathlib import Path, PurePosixPath

from torch.utils.data import Dataset
from torchvision.datasets import DatasetFolder

from refvision.data.cityscapes import CityscapesSegmentation
from refvision.data.coco import CocoDetection
from refvision.data.predict import ImageFiles, Source
from refvision.data.voc import VOCDetection


def source_of(dataset: Dataset, index: int) -> Source:
    """The file of sample ``index`` of ``dataset`` and the name its outputs get.

    Names: :class:`ImageFiles` the path under its root; VOC the image id (``000005``); COCO the
    ``file_name`` without its suffix; Cityscapes ``<city>/<city>_<seq>_<frame>_leftImg8bit``; image
    folders ``<class>/<stem>``.
    """
    if isinstance(dataset, (ImageFiles, CocoDetection)):
        return dataset.source(index)
    if isinstance(dataset, VOCDetection):
        annotation = dataset.annotations[index]
        return Source(annotation.image_path, PurePosixPath(annotation.image_path.stem))
    if isinstance(dataset, CityscapesSegmentation):
        path = Path(dataset.samples[index][0])
        return Source(path, PurePosixPath(path.parent.name, path.name.removesuffix(".png")))
    if isinstance(dataset, DatasetFolder):
        path = Path(dataset.samples[index][0])
        return Source(path, PurePosixPath(path.relative_to(dataset.root).with_suffix("").as_posix()))
    raise TypeError(
        f"cannot tell which file each sample of {type(dataset).__name__} comes from, so predictions cannot be "
        f"named after their input files; use refvision.data.PredictImagesDataModule (a folder of images)"
    )


def sources(dataset: Dataset) -> list[Source]:
    """:func:`source_of` for every sample, in dataset order."""
    return [source_of(dataset, index) for index in range(len(dataset))]  # type: ignore[arg-type]
