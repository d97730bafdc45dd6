"""Image decoding and cheap header checks whose errors name the file.

JPEG, PNG, WebP and GIF are decoded by ``torchvision.io``; BMP, TIFF and the netpbm formats
(PPM / PGM / PBM) by Pillow. The format is taken from the file's first bytes, not its suffix.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image

TORCHVISION_FORMATS = ("jpeg", "png", "webp", "gif")
PIL_FORMATS = ("bmp", "tiff", "netpbm")
READABLE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
"""Suffixes of the files the image readers take (the content decides how they are decoded)."""
UNREADABLE_IMAGE_SUFFIXES = (".heic", ".heif", ".avif", ".jxl", ".jp2", ".svg", ".raw", ".dng", ".cr2", ".nef")
"""Image suffixes nothing here decodes: such files are bad samples, never silently ignored."""
HEADER_BYTES = 32
_CPP_LOCATION = re.compile(r"^\w+, \S+\.cpp:\d+, ")
"""torchvision's ``"decode_jpeg, /path/decode_jpeg.cpp:171, "`` prefix of its decoder errors."""


class BadImageError(ValueError):
    """An image file that is empty, not an image, truncated or otherwise unreadable.

    The message starts with the file's path. One-argument constructor, so the exception
    crosses from a data-loader worker to the main process with its type.
    """


@dataclass(frozen=True)
class ImageHeader:
    """What the first bytes of an image file say. ``bit_depth`` is known for PNG only."""

    format: str
    bit_depth: int | None = None


def _format(head: bytes) -> str | None:
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head[:2] == b"BM":
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if len(head) >= 2 and head[0:1] == b"P" and head[1:2] in b"123456":
        return "netpbm"
    return None


def read_header(path: str | Path) -> ImageHeader:
    """Read only the first bytes of ``path`` and say which image format it holds.

    Raises ``FileNotFoundError`` for a missing file and :class:`BadImageError` for an empty
    file or one that starts like no format listed in this module.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    with path.open("rb") as file:
        head = file.read(HEADER_BYTES)
    if not head:
        raise BadImageError(f"{path}: the file is empty (0 bytes)")
    image_format = _format(head)
    if image_format is None:
        raise BadImageError(f"{path}: not a JPEG, PNG, WebP, GIF, BMP, TIFF or PPM/PGM/PBM file (starts {head[:8]!r})")
    if image_format == "png":
        # IHDR is the first chunk: 8 signature + 8 chunk header + width, height (4 each), then bit depth.
        if len(head) < 26 or head[12:16] != b"IHDR":
            raise BadImageError(f"{path}: PNG without a complete IHDR header (truncated)")
        return ImageHeader("png", bit_depth=head[24])
    return ImageHeader(image_format)


def decode(path: str | Path, mode: ImageReadMode = ImageReadMode.RGB) -> Tensor:
    """Decode an image file to ``(C, H, W)`` (``C`` set by ``mode``; ``uint8``, or ``uint16`` for 16-bit PNG).

    An animated GIF gives its first frame, as Pillow's ``Image.open`` does. Raises
    ``FileNotFoundError`` for a missing file and :class:`BadImageError` (a ``ValueError``)
    for one that cannot be decoded, both naming the file.
    """
    header = read_header(path)
    if header.format in PIL_FORMATS:
        return _decode_pil(Path(path), mode)
    data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
    try:
        image = decode_image(data, mode=mode)
    except RuntimeError as error:
        reason = _CPP_LOCATION.sub("", str(error))
        raise BadImageError(f"{path}: cannot decode {header.format.upper()} ({reason})") from None
    return image[0] if image.ndim == 4 else image


def _decode_pil(path: Path, mode: ImageReadMode) -> Tensor:
    try:
        with Image.open(path) as image:
            if mode == ImageReadMode.RGB:
                image = image.convert("RGB")
            elif mode == ImageReadMode.GRAY:
                image = image.convert("L")
            elif mode != ImageReadMode.UNCHANGED:
                raise ValueError(f"decode: mode {mode} is not supported for {path}")
            array = np.array(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise BadImageError(f"{path}: cannot decode ({error})") from None
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()
