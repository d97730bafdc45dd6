"""Segmentation inference: whole image or sliding window, with flip / multi-scale averaging.

All functions take a network mapping ``(B, 3, h, w)`` (h, w multiples of ``divisor``) to logits
``(B, C, h, w)`` and return logits ``(B, C, H, W)`` at the input's resolution.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def whole_inference(model: nn.Module, images: Tensor, divisor: int = 16) -> Tensor:
    """Pad ``images`` right/bottom to a multiple of ``divisor``, run ``model``, crop back."""
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % divisor, -width % divisor
    logits = model(F.pad(images, (0, pad_w, 0, pad_h)))
    return logits[..., :height, :width]


def slide_inference(
    model: nn.Module, images: Tensor, crop: Sequence[int], stride: Sequence[int], num_classes: int, divisor: int = 16
) -> Tensor:
    """Average the logits of overlapping ``crop`` windows placed every ``stride`` pixels.

    Windows are laid out as MMSegmentation's ``slide_inference``: the last window of a row or
    column is shifted back to end at the image border; each pixel's logits are the mean over the
    windows covering it.
    """
    batch, _, height, width = images.shape
    crop_h, crop_w = crop
    stride_h, stride_w = stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    total = images.new_zeros(batch, num_classes, height, width)
    count = images.new_zeros(1, 1, height, width)
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * stride_h + crop_h, height), min(col * stride_w + crop_w, width)
            y1, x1 = max(y2 - crop_h, 0), max(x2 - crop_w, 0)
            total[..., y1:y2, x1:x2] += whole_inference(model, images[..., y1:y2, x1:x2], divisor)
            count[..., y1:y2, x1:x2] += 1
    return total / count


def segment(
    model: nn.Module,
    images: Tensor,
    num_classes: int,
    mode: str = "whole",
    crop: Sequence[int] = (512, 1024),
    stride: Sequence[int] = (341, 683),
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
) -> Tensor:
    """Logits ``(B, num_classes, H, W)`` for normalized ``images (B, 3, H, W)``.

    ``mode`` is ``whole`` or ``slide``; with several ``scales`` and/or ``flip`` the logits of every
    rescaled (and mirrored) copy are resized back to ``H x W`` and averaged.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"model.inference={mode!r}; allowed: whole, slide")
    height, width = images.shape[-2:]
    outputs = []
    for scale in scales:
        scaled = (
            images if scale == 1.0 else F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
        )
        for mirrored in (False, True) if flip else (False,):
            x = scaled.flip(-1) if mirrored else scaled
            if mode == "whole":
                logits = whole_inference(model, x)
            else:
                logits = slide_inference(model, x, crop, stride, num_classes)
            logits = logits.flip(-1) if mirrored else logits
            if logits.shape[-2:] != (height, width):
                logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            outputs.append(logits)
    return torch.stack(outputs).mean(0)
