"""Image decoding and cheap header checks whose errors name the file.

JPEG, PNG, WebP and GIF are decoded by ``torchvision.io``; BMP, TIFF and the netpbm formats
(PPM / PGM / PBM) by Pillow, as is WebP when its EXIF orientation is applied. The format is
taken from the file's first bytes, not its suffix.
8-bit images decode to ``uint8``, 16-bit ones (PNG, TIFF, PGM) to ``uint16``; images whose
pixels fit neither (32-bit float or integer TIFF) are refused.

Before any decoder sees a file, its header gives the image's width and height, and an image of
more than :func:`max_image_pixels` pixels is refused (every format: a 389 KB PNG can declare
20000 x 20000 pixels). A PNG's image data is inflated and checked before libpng decodes it:
libpng, as torchvision runs it, ends the process with a segmentation fault on image data that is
short, fails its checksum or has a bad row filter, instead of raising.
"""

import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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


MAX_PIXELS_VARIABLE = "REFVISION_MAX_IMAGE_PIXELS"
"""The environment variable that sets :func:`max_image_pixels` (inherited by data-loader workers)."""
DEFAULT_MAX_IMAGE_PIXELS = 2 * (1024 * 1024 * 1024 // 4 // 3)
"""178956970 (about 0.5 GB as 24-bit RGB): where Pillow refuses an image by default, twice its
``PIL.Image.MAX_IMAGE_PIXELS``, so no image Pillow opens by default is refused."""
_NETPBM_HEADER_BYTES = 1024
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
"""Samples per pixel of each PNG colour type."""
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
"""The seven passes of PNG's Adam7 interlacing: first column, first row, column step, row step."""
_PILLOW_PNG = {
    (0, ImageReadMode.GRAY),
    (0, ImageReadMode.UNCHANGED),
    (0, ImageReadMode.RGB),
    (2, ImageReadMode.RGB),
    (2, ImageReadMode.UNCHANGED),
}
"""8-bit PNGs (IHDR colour type, read mode) that Pillow decodes to exactly torchvision's pixels (no
colour conversion, no transparency): Pillow raises on bad image data, in 1.2 to 1.5 times
torchvision's time, where checking the data for libpng doubles it (``benchmarks/png_decode.py``)."""
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
"""JPEG start-of-frame markers (SOF0..SOF15 less DHT, JPG and DAC), whose segment holds the image size."""


class BadImageError(ValueError):
    """An image file that is empty, not an image, truncated or otherwise unreadable.

    The message starts with the file's path. One-argument constructor, so the exception
    crosses from a data-loader worker to the main process with its type.
    """


@dataclass(frozen=True)
class ImageHeader:
    """What the header of an image file says: its format and its ``width`` x ``height`` in pixels
    (for GIF the logical screen, for TIFF the first image). ``bit_depth`` and ``colour_type``
    (IHDR's: 0 grayscale, 2 RGB, 3 palette, 4 grayscale + alpha, 6 RGBA) are known for PNG only."""

    format: str
    width: int
    height: int
    bit_depth: int | None = None
    colour_type: int | None = None


def max_image_pixels() -> int:
    """The most pixels (width x height) an image may have: ``$REFVISION_MAX_IMAGE_PIXELS``, else
    :data:`DEFAULT_MAX_IMAGE_PIXELS`. A value that is not a positive integer is a ``ValueError``."""
    text = os.environ.get(MAX_PIXELS_VARIABLE)
    if text is None:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{MAX_PIXELS_VARIABLE}={text!r}: expected a positive number of pixels per image")
    return value


def check_pixels(path: str | Path, width: int, height: int) -> None:
    """Raise :class:`BadImageError` naming ``path``, its size, the limit and how to raise it, if the
    image has more than :func:`max_image_pixels` pixels."""
    limit = max_image_pixels()
    if width * height > limit:
        raise BadImageError(
            f"{path}: {width} x {height} pixels ({width * height}) is over the limit of {limit} pixels per image "
            f"(a guard against decompression bombs); if you trust the file, raise it with the environment "
            f"variable {MAX_PIXELS_VARIABLE}={width * height}"
        )


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


def read_header(path: str | Path, other_pillow_formats: bool = False) -> ImageHeader:
    """Read the header of ``path`` (never the pixels): its format and size; check the pixel limit.

    Reads the first bytes, and for JPEG, TIFF and PPM/PGM/PBM as far as their size is stored.
    ``other_pillow_formats=True`` reads a file in none of this module's formats with Pillow's
    ``Image.open`` (header only; ``format`` is then Pillow's name, lower case). Raises
    ``FileNotFoundError`` for a missing file and :class:`BadImageError` for an empty file, one
    that starts like no format read here, one whose header is cut short or malformed, and one
    of more than :func:`max_image_pixels` pixels (see :func:`check_pixels`).
    """
    path = Path(path)
    head = _head(path)
    image_format = _format(head)
    if image_format is None and other_pillow_formats:
        try:
            with Image.open(path) as image:
                header = ImageHeader(str(image.format).lower(), image.width, image.height)
        except PILLOW_ERRORS as error:
            raise BadImageError(f"{path}: cannot read image ({describe_pillow_error(error)})") from None
        check_pixels(path, header.width, header.height)
        return header
    if image_format is None:
        raise BadImageError(f"{path}: not a JPEG, PNG, WebP, GIF, BMP, TIFF or PPM/PGM/PBM file (starts {head[:8]!r})")
    header = _size(path, image_format, head)
    check_pixels(path, header.width, header.height)
    return header


def _size(path: Path, image_format: str, head: bytes) -> ImageHeader:
    """The :class:`ImageHeader` of ``path``, whose first bytes ``head`` are of ``image_format``."""
    cut = BadImageError(f"{path}: {image_format.upper()} header cut short (truncated)")
    if image_format == "png":
        # IHDR is the first chunk: 8 signature + 8 chunk header + width, height (4 each), bit depth, colour type.
        if len(head) < 26 or head[12:16] != b"IHDR":
            raise BadImageError(f"{path}: PNG without a complete IHDR header (truncated)")
        width, height = struct.unpack(">II", head[16:24])
        return ImageHeader("png", width, height, bit_depth=head[24], colour_type=head[25])
    if image_format == "gif":
        if len(head) < 10:
            raise cut
        return ImageHeader("gif", *struct.unpack("<HH", head[6:10]))
    if image_format == "bmp":
        if len(head) < 26:
            raise cut
        if struct.unpack("<I", head[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
            return ImageHeader("bmp", *struct.unpack("<HH", head[18:22]))
        width, height = struct.unpack("<ii", head[18:26])
        return ImageHeader("bmp", abs(width), abs(height))  # a negative height stores rows top-down
    if image_format == "webp":
        return ImageHeader("webp", *_webp_size(path, head))
    with path.open("rb") as file:
        if image_format == "jpeg":
            return ImageHeader("jpeg", *_jpeg_size(path, file))
        if image_format == "tiff":
            return ImageHeader("tiff", *_tiff_size(path, file))
        return ImageHeader("netpbm", *_netpbm_size(path, file.read(_NETPBM_HEADER_BYTES)))


def _webp_size(path: Path, head: bytes) -> tuple[int, int]:
    """``(width, height)`` of a WebP file from its first chunk (lossy ``VP8``, lossless ``VP8L`` or ``VP8X``)."""
    chunk = head[12:16]
    if chunk == b"VP8 " and len(head) >= 30:
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(head) >= 25:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(head) >= 30:
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    raise BadImageError(f"{path}: WebP without a complete VP8 / VP8L / VP8X header (truncated or corrupt)")


def _jpeg_size(path: Path, file: BinaryIO) -> tuple[int, int]:
    """``(width, height)`` from a JPEG's start-of-frame segment, skipping the segments before it."""
    file.seek(2)
    while True:
        marker = file.read(2)
        while marker[:1] == b"\xff" and marker[1:2] == b"\xff":  # fill bytes before a marker
            marker = marker[1:] + file.read(1)
        if len(marker) < 2 or marker[0] != 0xFF:
            raise BadImageError(f"{path}: JPEG ends or breaks off before its frame header (truncated or corrupt)")
        code = marker[1]
        if code == 0x01 or 0xD0 <= code <= 0xD8:  # markers without a segment
            continue
        if code in (0xD9, 0xDA):
            raise BadImageError(f"{path}: JPEG without a frame header before its image data (corrupt)")
        length = file.read(2)
        if len(length) < 2 or int.from_bytes(length, "big") < 2:
            raise BadImageError(f"{path}: JPEG segment header cut short (truncated or corrupt)")
        if code in _JPEG_FRAMES:
            frame = file.read(5)
            if len(frame) < 5:
                raise BadImageError(f"{path}: JPEG frame header cut short (truncated)")
            height, width = struct.unpack(">HH", frame[1:5])
            if height == 0 or width == 0:
                raise BadImageError(f"{path}: JPEG frame header declares {width} x {height} pixels")
            return width, height
        file.seek(int.from_bytes(length, "big") - 2, os.SEEK_CUR)


def _tiff_size(path: Path, file: BinaryIO) -> tuple[int, int]:
    """``(width, height)`` of the first image of a TIFF: tags 256 and 257 of its first IFD."""
    order = "<" if file.read(2) == b"II" else ">"
    file.seek(4)
    data = file.read(4)
    if len(data) < 4:
        raise BadImageError(f"{path}: TIFF header cut short (truncated)")
    file.seek(struct.unpack(f"{order}I", data)[0])
    count = file.read(2)
    entries = file.read(12 * int.from_bytes(count, "little" if order == "<" else "big")) if len(count) == 2 else b""
    size: dict[int, int] = {}
    for start in range(0, len(entries) - 11, 12):
        tag, kind = struct.unpack(f"{order}HH", entries[start : start + 4])
        if tag in (256, 257) and kind in (3, 4):  # SHORT or LONG
            value = entries[start + 8 : start + 12]
            size[tag] = struct.unpack(f"{order}H", value[:2])[0] if kind == 3 else struct.unpack(f"{order}I", value)[0]
    if 256 not in size or 257 not in size:
        raise BadImageError(
            f"{path}: TIFF whose first image directory gives no width and height (truncated or corrupt)"
        )
    return size[256], size[257]


def _netpbm_size(path: Path, head: bytes) -> tuple[int, int]:
    """``(width, height)``: the two numbers after a PPM / PGM / PBM magic number (``#`` comments skipped)."""
    text = re.sub(rb"#[^\n\r]*", b" ", head[2:])
    numbers = re.match(rb"\s+(\d+)\s+(\d+)\s", text)
    if numbers is None:
        raise BadImageError(f"{path}: PPM / PGM / PBM header without a width and height (truncated or corrupt)")
    return int(numbers.group(1)), int(numbers.group(2))


def _png_chunks(path: str | Path, data: bytes | memoryview) -> tuple[list[bytes | memoryview], set[str]]:
    """Check the chunks of ``data``, the whole PNG file ``path``; return its ``IDAT`` data and its chunk names.

    Every chunk must lie within the file and match its CRC-32, up to an ``IEND`` chunk (bytes
    after ``IEND`` are not read), and the ``IDAT`` chunks must follow each other (libpng reads
    only the first run). Raises :class:`BadImageError` naming the file and the chunk.
    """
    position, size = len(_PNG_SIGNATURE), len(data)
    idat: list[bytes | memoryview] = []
    names: set[str] = set()
    previous = ""
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
            break
        if name == "IDAT":
            if idat and previous != "IDAT":
                raise BadImageError(
                    f"{path}: PNG chunk 'IDAT' at byte {position} follows a {previous!r} chunk, "
                    "apart from the IDAT chunks before it (corrupt file)"
                )
            idat.append(data[position + 8 : end])
        names.add(name)
        previous, position = name, end + 4
    return idat, names


def _check_png_rows(path: str | Path, idat: list[bytes | memoryview], header: ImageHeader, interlaced: bool) -> None:
    """Check a PNG's ``IDAT`` data so that libpng can decode it without crashing.

    libpng, as torchvision runs it, ends the process (a segmentation fault, no Python error) on
    any error it meets while reading the image data. So, before it sees the file, the zlib
    stream must inflate without error to its end (Adler-32 checked) and give at least the
    image's bytes (``interlaced``: the seven Adam7 passes), each row starting with a filter type
    0..4. A longer stream passes: libpng ignores what follows the last row. Raises
    :class:`BadImageError` naming the file and the fault.

    A colour type / bit depth that PNG does not define is left to libpng, which refuses it
    (with an error, not a crash) while reading the header.
    """
    channels = _PNG_CHANNELS.get(header.colour_type or 0)
    if channels is None or header.bit_depth not in (1, 2, 4, 8, 16):
        return
    bits = channels * header.bit_depth
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    rows = []  # (offset of the row's filter byte, rows, bytes per row including the filter byte)
    offset = 0
    for x0, y0, dx, dy in passes:
        width, height = -(-max(header.width - x0, 0) // dx), -(-max(header.height - y0, 0) // dy)
        if width and height:
            stride = 1 + -(-width * bits // 8)
            rows.append((offset, height, stride))
            offset += height * stride
    if not idat:
        raise BadImageError(f"{path}: PNG without an IDAT chunk (no image data)")
    inflate = zlib.decompressobj()
    try:
        pixels = inflate.decompress(b"".join(idat), offset)
        while inflate.unconsumed_tail:  # what follows the last row is not kept, only inflated to its end
            inflate.decompress(inflate.unconsumed_tail, 1 << 16)
    except zlib.error as error:
        raise BadImageError(f"{path}: PNG image data is corrupt ({error})") from None
    if not inflate.eof:
        raise BadImageError(f"{path}: PNG image data breaks off before the end of its zlib stream (truncated)")
    if len(pixels) < offset:
        raise BadImageError(
            f"{path}: PNG image data holds {len(pixels)} bytes, {header.width} x {header.height} pixels need "
            f"{offset} (not enough image data)"
        )
    array = np.frombuffer(pixels, np.uint8)
    for start, height, stride in rows:
        filters = array[start : start + height * stride : stride]
        if filters.max() > 4:
            row = int(np.argmax(filters > 4))
            raise BadImageError(
                f"{path}: PNG row {row} has filter type {int(filters[row])}; PNG defines 0..4 (corrupt image data)"
            )


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
    Pillow if Pillow reads it (``.tga``, ``.ico``, ...). The header is read first: an image of
    more than :func:`max_image_pixels` pixels is refused before it is decoded. Raises
    ``FileNotFoundError`` for a missing file and :class:`BadImageError` (a ``ValueError``) for
    one that cannot be decoded, is over the pixel limit or whose pixels fit neither 8 nor 16
    bits, both naming the file.
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
        idat, chunks = _png_chunks(path, memoryview(data))
        if header.bit_depth == 8 and (header.colour_type, mode) in _PILLOW_PNG and "tRNS" not in chunks:
            return _decode_pil(path, mode, exif_orientation)
        _check_png_rows(path, idat, header, bytes(data[28:29]) == b"\x01")
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
            check_pixels(path, *image.size)  # formats read_header does not know (.tga, .ico, ...) meet it here
            if exif_orientation:
                image = ImageOps.exif_transpose(image)
            pil_mode = image.mode
            if pil_mode not in _WIDE_MODES and mode != ImageReadMode.UNCHANGED:
                image = image.convert("RGB" if mode == ImageReadMode.RGB else "L")
            array = np.array(image)
    except BadImageError:
        raise
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
