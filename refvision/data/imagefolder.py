"""Classification data from an image-folder tree: ``root/{train,val[,test]}/<class>/<image>``."""

from pathlib import Path

from torchvision import tv_tensors
from torchvision.datasets import ImageFolder

from refvision.data import presets
from refvision.data.loader import SplitDataModule
from refvision.data.decode import decode

DECODABLE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif")
"""Files ``torchvision.io.decode_image`` reads; other files in class folders are ignored."""

LAYOUT = "root/train/<class>/<image>, root/val/<class>/<image>, optional root/test/<class>/<image>"


def decode_rgb(path: str) -> tv_tensors.Image:
    """``ImageFolder`` loader: ``Image (3, H, W) uint8`` RGB; errors name the file."""
    return tv_tensors.Image(decode(path))


def _is_decodable(path: str) -> bool:
    return path.lower().endswith(DECODABLE_SUFFIXES)


def _class_names(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise FileNotFoundError(f"image-folder split {split_dir} does not exist; expected layout {LAYOUT}")
    names = sorted(entry.name for entry in split_dir.iterdir() if entry.is_dir())
    if not names:
        raise FileNotFoundError(f"{split_dir} has no class folders; expected layout {LAYOUT}")
    return names


class ImageFolderDataModule(SplitDataModule):
    """Train / val / test image folders with torchvision's classification reference presets.

    Batches are ``(images (B, 3, image_size, image_size) float32 normalized, labels (B,) int64)``.
    Class folders are sorted by name (``ImageFolder`` order) and must be identical in every split.
    ``test`` and ``predict`` use ``root/test`` when it exists, else ``root/val``.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        resize_size: int = 256,
        batch_size: int = 32,
        num_workers: int = 4,
        pin_memory: bool = True,
        interpolation: str = "bilinear",
        auto_augment: str | None = None,
        random_erase: float = 0.0,
        crop_scale: tuple[float, float] = (0.08, 1.0),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root)
        self.test_split = "test" if (self.root / "test").is_dir() else "val"
        self.class_names = _class_names(self.root / "train")
        for split in dict.fromkeys(("val", self.test_split)):
            names = _class_names(self.root / split)
            if names != self.class_names:
                raise ValueError(
                    f"class folders differ: {self.root / 'train'} has {self.class_names}, "
                    f"{self.root / split} has {names}"
                )
        self.num_classes = len(self.class_names)
        self.train_transform = presets.classification_train(
            image_size, interpolation, auto_augment, random_erase, crop_scale
        )
        self.eval_transform = presets.classification_eval(image_size, resize_size, interpolation)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory

    def _dataset(self, split: str, train: bool) -> ImageFolder:
        transform = self.train_transform if train else self.eval_transform
        return ImageFolder(str(self.root / split), transform, loader=decode_rgb, is_valid_file=_is_decodable)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.train_set = self._dataset("train", train=True)
        if stage in ("fit", "validate"):
            self.val_set = self._dataset("val", train=False)
        if stage in ("test", "predict"):
            self.test_set = self._dataset(self.test_split, train=False)

