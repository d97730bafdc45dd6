"""Drawing and bookkeeping shared by the demo-data writers: the manifest that makes a writer idempotent,
PNG / JPEG saving, coordinate grids, textured backgrounds and painted regions."""

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

FORMAT_VERSION = 2  # 2: separate val and test splits in every dataset
MANIFEST = ".refvision-demo.json"
Array = np.ndarray


def claim(root: Path, kind: str, params: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest to write once ``root`` is filled, or ``None`` if the same dataset is there."""
    record = json.loads(json.dumps({"kind": kind, "version": FORMAT_VERSION, "params": params}))
    manifest = root / MANIFEST
    if manifest.is_file():
        found = json.loads(manifest.read_text())
        if found == record:
            return None
        raise ValueError(
            f"{root} already holds a different demo dataset ({found}); requested {record}. "
            "Remove it or choose another root."
        )
    if root.exists() and any(root.iterdir()):
        raise ValueError(
            f"{root} is not empty and holds no {MANIFEST}; refusing to write a demo dataset into it "
            "(if an earlier write was interrupted, remove the folder)"
        )
    root.mkdir(parents=True, exist_ok=True)
    return record


def save_image(array: Array, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if path.suffix == ".jpg":
        image.save(path, quality=92)
    else:
        image.save(path)


def to_uint8(image: Array) -> Array:
    return np.clip(image, 0, 255).round().astype(np.uint8)


def grid(height: int, width: int) -> tuple[Array, Array]:
    """Pixel-center coordinates ``(yy, xx)``, each ``(height, width)``."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    return yy + 0.5, xx + 0.5


def background(rng: np.random.Generator, height: int, width: int) -> Array:
    """``(H, W, 3)`` float: a two-color gradient in a random direction, soft blotches, noise."""
    yy, xx = grid(height, width)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * xx + np.sin(angle) * yy
    t = (t - t.min()) / (np.ptp(t) + 1e-6)
    low, high = rng.uniform(30, 225, (2, 3))
    image = low + t[..., None] * (high - low)
    for _ in range(rng.integers(2, 5)):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        sigma = rng.uniform(0.1, 0.3) * max(height, width)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        image += blob[..., None] * rng.uniform(-50, 50, 3)
    return image + rng.normal(0, rng.uniform(3, 12), image.shape)


def paint_region(image: Array, mask: Array, color: Array, rng: np.random.Generator, noise: float = 8.0) -> None:
    image[mask] = color + rng.normal(0, noise, (int(mask.sum()), 3))


def contrasting(rng: np.random.Generator, other: Array) -> Array:
    """A random RGB color at least 80 away (L2) from ``other``, so the drawn thing stands out."""
    for _ in range(20):
        color = rng.uniform(0, 255, 3)
        if np.linalg.norm(color - other) >= 80:
            return color
    return 255 - other


# ---------------------------------------------------------------- image folder
