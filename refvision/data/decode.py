"""Image decoding with ``torchvision.io`` whose errors name the file."""

from pathlib import Path

from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, read_file


def decode(path: str | Path, mode: ImageReadMode = ImageReadMode.RGB) -> Tensor:
    """Decode a JPEG / PNG / WebP / GIF file to ``(C, H, W) uint8`` (``C`` set by ``mode``).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for one that cannot be
    decoded, both naming the file.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    try:
        return decode_image(read_file(str(path)), mode=mode)
    except RuntimeError as error:
        raise ValueError(f"cannot decode image {path}: {error}") from error
