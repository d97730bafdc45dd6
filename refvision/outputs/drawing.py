"""Text drawn into images for people: detection boxes with readable labels, and a colour legend band.

Sizes follow the image (:func:`font_size_for`), so labels read at the image's own size. The font
is DejaVu Sans, which matplotlib ships, so drawing needs no system font and no download.
"""

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

RGB = tuple[int, int, int]

_FONT_FILE = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"), fallback_to_default=True)
_LEGEND_BACKGROUND: RGB = (255, 255, 255)
_SWATCH_EDGE: RGB = (64, 64, 64)


def font_size_for(height: int, width: int) -> int:
    """Text size in pixels for an image of ``height x width``: 3 % of its longer side, within 12..40."""
    return int(min(40, max(12, round(0.03 * max(height, width)))))


def text_color(background: RGB) -> RGB:
    """Black or white, whichever reads better on ``background`` (by its luma, ITU-R BT.601)."""
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b >= 128 else (255, 255, 255)


def draw_detections(image: Tensor, boxes: Tensor, texts: Sequence[str], colors: Sequence[RGB]) -> Tensor:
    """``image`` with each box outlined in its colour and labelled on a tag filled with that colour.

    Args:
        image: ``uint8 (3, H, W)`` RGB.
        boxes: ``(N, 4)`` ``xyxy`` in pixels of ``image``.
        texts: ``N`` labels, e.g. ``"dog 0.87"``.
        colors: ``N`` RGB colours.

    Returns:
        ``uint8 (3, H, W)``. The tag sits on the box's top-left corner, above the box where there
        is room and inside it otherwise, moved into the image where it would leave it; its text is
        black or white (:func:`text_color`). Tags are drawn after all boxes, the first box's last,
        so the first (the most confident, in detector order) reads in full. With ``N = 0`` the
        image is returned as it is.
    """
    if not len(texts) == len(colors) == len(boxes):
        raise ValueError(
            f"boxes, texts, colors: expected one each per box, got {len(boxes)}, {len(texts)}, {len(colors)}"
        )
    if len(boxes) == 0:
        return image
    height, width = image.shape[-2:]
    size = font_size_for(height, width)
    font = ImageFont.truetype(_FONT_FILE, size)
    pad = max(2, size // 6)
    line = max(2, round(size / 8))
    canvas = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    draw = ImageDraw.Draw(canvas)
    corners = boxes.round().to(torch.int64).tolist()
    for (x0, y0, x1, y1), color in zip(corners, colors):
        draw.rectangle((x0, y0, x1, y1), outline=tuple(color), width=line)
    ascent, descent = font.getmetrics()
    tag_height = ascent + descent + 2 * pad
    for (x0, y0, _, _), text, color in reversed(list(zip(corners, texts, colors))):
        tag_width = round(draw.textlength(text, font=font)) + 2 * pad
        left = max(0, min(x0, width - tag_width))
        top = y0 - tag_height if y0 >= tag_height else y0
        top = max(0, min(top, height - tag_height))
        draw.rectangle((left, top, left + tag_width - 1, top + tag_height - 1), fill=tuple(color))
        draw.text((left + pad, top + pad), text, fill=text_color(tuple(color)), font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)


def append_legend(image: Tensor, entries: Sequence[tuple[str, RGB]]) -> Tensor:
    """``image`` with a white band below it listing ``entries``: a swatch of each colour, then its name.

    Args:
        image: ``uint8 (3, H, W)`` RGB.
        entries: ``(name, colour)`` pairs, in the order shown.

    Returns:
        ``uint8 (3, H + B, W')``: the image unchanged at the top left, the legend band of height
        ``B`` below, its entries flowing left to right in rows. ``W' = W`` unless an entry is wider
        than the image; then the picture widens to that entry, white on the image's right.
        No entries: ``image`` itself.
    """
    if not entries:
        return image
    height, width = image.shape[-2:]
    size = font_size_for(height, width)
    font = ImageFont.truetype(_FONT_FILE, size)
    gap = max(3, size // 2)
    ascent, descent = font.getmetrics()
    row = ascent + descent + gap
    widths = [size + gap // 2 + round(font.getlength(name)) for name, _ in entries]
    width = max(width, max(widths) + 2 * gap)
    placed: list[tuple[int, int, str, RGB]] = []
    x, y = gap, gap
    for (name, color), entry_width in zip(entries, widths):
        if x > gap and x + entry_width > width - gap:
            x, y = gap, y + row
        placed.append((x, y, name, color))
        x += entry_width + 2 * gap
    canvas = Image.new("RGB", (width, height + y + row), _LEGEND_BACKGROUND)
    canvas.paste(Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()), (0, 0))
    draw = ImageDraw.Draw(canvas)
    swatch_top = height + (ascent + descent - size) // 2
    for left, top, name, color in placed:
        draw.rectangle(
            (left, swatch_top + top, left + size - 1, swatch_top + top + size - 1),
            fill=tuple(color),
            outline=_SWATCH_EDGE,
        )
        draw.text((left + size + gap // 2, height + top), name, fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)
