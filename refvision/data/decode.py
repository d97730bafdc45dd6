"""Image decoding and cheap header checks whose errors name the file.

JPEG, PNG, WebP and GIF are decoded by ``torchvision.io``; BMP, TIFF and the netpbm formats
(PPM / PGM / PBM) by Pillow, as is WebP when its EXIF orientation is applied. The format is
taken from the file's first bytes, not its suffix.
8-bit images decode to ``uint8``, 16-bit ones (PNG, TIFF, PGM) to ``uint16``; images whose
pixels fit neither (32-bit float or integer TIFF) are refused.
"""

import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image

TORCHVISION_FORMATS = ("jpeg", "png", "webp", "gif")
PIL_FORMATS = ("bmp", "tiff", "netpbm")
READABLE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
"""Suffixes of the files the image readers take (the content decides how they are decoded)."""
UNREADABLE_IMAGE_SUFFIXES = (".heic", ".heif", ".avif", ".jxl", ".jp2", ".svg", ".raw", ".dng", ".cr2", ".nef")
"""Image suffixes nothing here decodes: such files are bad samples, never silently ignored."""
HEADER_BYTES = 32
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PILLOW_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, Image.DecompressionBombError)
"""What Pillow raises for a file it cannot open or decode: its plugins raise ``ValueError`` or
``TypeError`` on some malformed headers, and ``DecompressionBombError`` is no ``OSError``."""
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
"""Pillow modes of one-channel images with more than 8 bits per pixel."""
_CPP_LOCATION = re.compile(r"^[^,\s]+, \S+\.cpp:\d+, ")
"""torchvision's ``"decode_jpeg, /path/decode_jpeg.cpp:171, "`` or ``"operator(), /path/decode_png.cpp:79, "``
prefix of its decoder errors."""


class BadImageError(ValueError):
    """An image file that is empty, not an image, truncated or otherwise unreadable.

    The message starts with the file's path. One-argument constructor, so the exception
    crosses from a data-loader worker to the main process with its type.
    """


@dataclass(frozen=True)
class ImageHeader:
    """What the first bytes of an image file say. ``bit_depth`` and ``colour_type`` (IHDR's: 0
    grayscale, 2 RGB, 3 palette, 4 grayscale + alpha, 6 RGBA) are known for PNG only."""

    format: str
    bit_depth: int | None = None
    colour_type: int | None = None


def _format(head: bytes) -> str | None:
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(_PNG_SIGNATURE):
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


def _head(path: Path) -> bytes:
    """The first :data:`HEADER_BYTES` of ``path``; errors for a missing or empty file."""
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    with path.open("rb") as file:
        head = file.read(HEADER_BYTES)
    if not head:
        raise BadImageError(f"{path}: the file is empty (0 bytes)")
    return head


def read_header(path: str | Path) -> ImageHeader:
    """Read only the first bytes of ``path`` and say which image format it holds.

    Raises ``FileNotFoundError`` for a missing file and :class:`BadImageError` for an empty
    file or one that starts like no format listed in this module.
    """
    path = Path(path)
    head = _head(path)
    image_format = _format(head)
    if image_format is None:
        raise BadImageError(f"{path}: not a JPEG, PNG, WebP, GIF, BMP, TIFF or PPM/PGM/PBM file (starts {head[:8]!r})")
    if image_format == "png":
        # IHDR is the first chunk: 8 signature + 8 chunk header + width, height (4 each), then bit depth.
        if len(head) < 26 or head[12:16] != b"IHDR":
            raise BadImageError(f"{path}: PNG without a complete IHDR header (truncated)")
        return ImageHeader("png", bit_depth=head[24], colour_type=head[25])
    return ImageHeader(image_format)


def _check_png_chunks(path: str | Path, data: bytes | memoryview) -> None:
    """Check the chunk structure of ``data``, the whole PNG file ``path``, before it is decoded.

    Every chunk must lie within the file and match its CRC-32, up to an ``IEND`` chunk; bytes
    after ``IEND`` are not read. libpng, as torchvision runs it, crashes the process (a
    segmentation fault, no Python error) on a corrupt PNG instead of raising; a file damaged or
    truncated after it was written shows as a chunk that fails this check. Bad image data that
    a faulty encoder wrote under valid CRCs passes it, and still crashes libpng. Raises
    :class:`BadImageError` naming the file and the chunk.
    """
    position, size = len(_PNG_SIGNATURE), len(data)
    while True:
        if size - position < 12:
            raise BadImageError(f"{path}: PNG ends at byte {size} without its IEND chunk (truncated)")
        length = int.from_bytes(data[position : position + 4], "big")
        name = bytes(data[position + 4 : position + 8]).decode("ascii", "backslashreplace")
        end = position + 8 + length
        if length > size - position - 12:
            raise BadImageError(
                f"{path}: PNG chunk {name!r} at byte {position} declares {length} bytes, past the end of the "
                f"file ({size} bytes; truncated or corrupt)"
            )
        if zlib.crc32(data[position + 4 : end]) != int.from_bytes(data[end : end + 4], "big"):
            raise BadImageError(f"{path}: PNG chunk {name!r} at byte {position} fails its CRC-32 check (corrupt file)")
        if name == "IEND":
            return
        position = end + 4


def describe_pillow_error(error: Exception) -> str:
    """The message of ``error`` (one of :data:`PILLOW_ERRORS`); for Pillow's pixel limit, how to raise it."""
    if isinstance(error, Image.DecompressionBombError):
        return (
            f"{error} Pillow refuses images over twice PIL.Image.MAX_IMAGE_PIXELS (now {Image.MAX_IMAGE_PIXELS}); "
            "if you trust the file, set that higher"
        )
    return str(error)


def decode(
    path: str | Path,
    mode: ImageReadMode = ImageReadMode.RGB,
    exif_orientation: bool = False,
    other_pillow_formats: bool = False,
) -> Tensor:
    """Decode an image file to ``(C, H, W)``: ``uint8``, or ``uint16`` for 16-bit PNG, TIFF and PGM files.

    ``C`` is set by ``mode`` (``RGB``: 3, ``GRAY``: 1; ``UNCHANGED``: the file's own channels).
    ``exif_orientation=True`` gives the image as it is displayed, rotated / flipped by its EXIF
    orientation tag; ``False`` gives the pixel grid as stored, the grid annotations of VOC and
    Cityscapes are defined on. An animated GIF gives its first frame, as Pillow's ``Image.open``
    does. ``other_pillow_formats=True`` decodes a file in none of this module's formats with
    Pillow if Pillow reads it (``.tga``, ``.ico``, ...). Raises ``FileNotFoundError`` for a
    missing file and :class:`BadImageError` (a ``ValueError``) for one that cannot be decoded
    or whose pixels fit neither 8 nor 16 bits, both naming the file.
    """
    path = Path(path)
    if other_pillow_formats and _format(_head(path)) is None:
        return _decode_pil(path, mode, exif_orientation)
    header = read_header(path)
    # torchvision ignores the EXIF orientation of WebP; Pillow decodes it with the same libwebp.
    if header.format in PIL_FORMATS or (exif_orientation and header.format == "webp"):
        return _decode_pil(path, mode, exif_orientation)
    data = np.fromfile(path, dtype=np.uint8)
    if header.format == "png":
        _check_png_chunks(path, memoryview(data))
    try:
        image = decode_image(torch.from_numpy(data), mode=mode, apply_exif_orientation=exif_orientation)
    except RuntimeError as error:
        reason = _CPP_LOCATION.sub("", str(error))
        raise BadImageError(f"{path}: cannot decode {header.format.upper()} ({reason})") from None
    return image[0] if image.ndim == 4 else image


def _decode_pil(path: Path, mode: ImageReadMode, exif_orientation: bool) -> Tensor:
    if mode not in (ImageReadMode.RGB, ImageReadMode.GRAY, ImageReadMode.UNCHANGED):
        raise ValueError(f"decode: mode {mode} is not supported for {path}")
    try:
        with Image.open(path) as image:
            if exif_orientation:
                image = ImageOps.exif_transpose(image)
            pil_mode = image.mode
            if pil_mode not in _WIDE_MODES and mode != ImageReadMode.UNCHANGED:
                image = image.convert("RGB" if mode == ImageReadMode.RGB else "L")
            array = np.array(image)
    except PILLOW_ERRORS as error:
        raise BadImageError(f"{path}: cannot decode ({describe_pillow_error(error)})") from None
    if pil_mode in _WIDE_MODES:
        return _sixteen_bit(path, pil_mode, array, mode)
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def _sixteen_bit(path: Path, pil_mode: str, array: np.ndarray, mode: ImageReadMode) -> Tensor:
    """``(1 or 3, H, W) uint16`` of ``array (H, W)``, a one-channel image in a Pillow mode of :data:`_WIDE_MODES`.

    Pillow's own RGB conversion clips such pixels to 8 bits; torchvision gives a 16-bit PNG
    as ``uint16``, and so does this. Mode ``I`` (32-bit integers, also Pillow's mode for
    16-bit PGM) passes when every value fits 16 bits; mode ``F`` (32-bit float) never does.
    """
    expected = "expected an image with 8- or 16-bit integer pixels"
    if pil_mode == "F":
        raise BadImageError(f"{path}: 32-bit floating-point pixels (Pillow mode 'F'); {expected}")
    if pil_mode == "I" and array.size and (array.min() < 0 or array.max() > 65535):
        raise BadImageError(
            f"{path}: 32-bit integer pixels (Pillow mode 'I') with values {array.min()}..{array.max()}, "
            f"beyond 16 bits; {expected}"
        )
    tensor = torch.from_numpy(array.astype(np.uint16)).unsqueeze(0)
    return tensor.expand(3, -1, -1).contiguous() if mode == ImageReadMode.RGB else tensor
