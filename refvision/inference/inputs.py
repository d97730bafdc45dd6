"""What the predictor takes as an image, turned into the decoded ``Image (3, H, W)`` that ``refvision predict`` reads.

An image is a file path (``str`` or ``os.PathLike``), a PIL image, an ``(H, W, 3)`` ``uint8`` RGB numpy
array or a ``(3, H, W)`` RGB tensor (``uint8``, or floating point in [0, 1]). A path is decoded as
``refvision predict`` decodes its folder (:func:`refvision.data.predict.decode_displayed`: EXIF orientation
applied, ``uint16`` for a 16-bit file); a PIL image is taken as it is displayed too (its EXIF orientation
applied, then converted to RGB), so ``Image.open(path)`` and ``path`` give the same pixels.
"""

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torchvision import tv_tensors

from refvision.data.predict import decode_displayed

ImageInput = str | os.PathLike | Image.Image | np.ndarray | Tensor
"""One image the predictor takes (see the module docstring)."""

EXPECTED = "expected a file path, a PIL image, an (H, W, 3) uint8 RGB numpy array or a (3, H, W) RGB tensor"
_WIDE_PIL_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
"""Pillow modes of one-channel images with more than 8 bits per pixel, which ``convert("RGB")`` would clip."""


def as_image(image: Any, name: str) -> tv_tensors.Image:
    """``image`` as the decoded ``Image (3, H, W)`` ``uint8`` / ``uint16`` / float [0, 1] that the
    predict transforms take; ``name`` (``image``, ``images[3]``) is how errors call it.

    Raises:
        TypeError: ``image`` is none of the accepted kinds.
        ValueError: an array or tensor of another shape or dtype, an empty one, a float tensor with values
            outside [0, 1], a PIL image of more than 8 bits per channel, a path to a folder; or a file that
            cannot be decoded (:class:`refvision.data.decode.BadImageError`, naming the file).
        FileNotFoundError: a path to no file.
    """
    if isinstance(image, (str, os.PathLike)):
        if Path(image).is_dir():
            raise ValueError(f"{name}: {image} is a folder; expected an image file")
        return tv_tensors.Image(decode_displayed(image))
    if isinstance(image, Image.Image):
        return tv_tensors.Image(_from_pil(image, name))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
            raise ValueError(
                f"{name}: a numpy array of shape {image.shape} and dtype {image.dtype}; expected (H, W, 3) uint8 RGB "
                "(H, W > 0)"
            )
        return tv_tensors.Image(torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous())
    if isinstance(image, Tensor):
        return tv_tensors.Image(_checked_tensor(image, name).contiguous())  # as decoded: the kernels' memory layout
    raise TypeError(f"{name}: a {type(image).__module__}.{type(image).__qualname__}; {EXPECTED}")


def _from_pil(image: Image.Image, name: str) -> Tensor:
    image = ImageOps.exif_transpose(image)
    if image.mode in _WIDE_PIL_MODES:
        raise ValueError(
            f"{name}: a PIL image of mode {image.mode!r} (more than 8 bits per pixel); expected an 8-bit image "
            "(pass its file path to read it at 16 bits)"
        )
    array = np.array(image.convert("RGB"))
    if 0 in array.shape:
        raise ValueError(f"{name}: a PIL image of size {image.size}; expected one with pixels")
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _checked_tensor(image: Tensor, name: str) -> Tensor:
    shape = tuple(image.shape)
    if image.ndim != 3 or shape[0] != 3 or 0 in shape:
        batch = "; for a batch (B, 3, H, W) pass list(batch)" if image.ndim == 4 else ""
        raise ValueError(f"{name}: a tensor of shape {shape}; expected (3, H, W) RGB with H, W > 0{batch}")
    if image.dtype == torch.uint8:
        return image
    if not image.is_floating_point():
        raise ValueError(f"{name}: a tensor of dtype {image.dtype}; expected uint8 (0..255) or floating point (0..1)")
    low, high = float(image.min()), float(image.max())
    if not 0 <= low <= high <= 1:  # also refuses NaN
        raise ValueError(
            f"{name}: a floating-point tensor with values {low:g}..{high:g}; expected RGB in [0, 1] "
            "(a 0..255 image: pass it as uint8)"
        )
    return image
