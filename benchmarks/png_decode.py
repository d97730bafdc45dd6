"""What crash-safe PNG decoding costs: torchvision's PNG decoder alone vs refvision's two routes.

libpng, as torchvision runs it, crashes the process on bad image data. refvision decodes 8-bit
grayscale / RGB PNGs with Pillow, which raises instead; every other PNG (16-bit, palette,
alpha) has its image data inflated with zlib and checked (length, row filters) before libpng
decodes it. The script writes a Cityscapes-sized (2048 x 1024) RGB PNG of street-like content (smooth colour
regions, edges, sensor noise, so it compresses about as a Cityscapes frame does), then times,
the file already in memory for the first, from the page cache for the second:

- ``torchvision``: ``torchvision.io.decode_image`` of the file's bytes;
- ``refvision decode``: ``refvision.data.decode.decode`` of the path (header, chunk CRCs, Pillow);
- ``check + torchvision``: the route of the other PNGs on the same file (header, chunk CRCs,
  inflate check, then ``decode_image``).

Each is run ``--repeat`` times; the median is printed, and the ratio.

    python benchmarks/png_decode.py [--width 2048] [--height 1024] [--repeat 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torchvision.io import decode_image, write_png

from refvision.data.decode import _check_png_rows, _png_chunks, decode, read_header


def street_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    """``(height, width, 3) uint8``: flat-coloured blocks with soft gradients and noise."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, (height // 64 + 1, width // 64 + 1, 3)).astype(np.float32)
    image = np.kron(cells, np.ones((64, 64, 1), np.float32))[:height, :width]
    ramp = np.linspace(0, 40, width, dtype=np.float32)[None, :, None]
    image = image * 0.8 + ramp + rng.normal(0, 3, (height, width, 3)).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def median_seconds(run: Callable[[], object], repeat: int) -> float:
    run()  # warm caches and allocators
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a data-loader worker uses 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "frame.png"
        pixels = torch.from_numpy(street_like(args.width, args.height)).permute(2, 0, 1).contiguous()
        write_png(pixels, str(path), compression_level=6)
        data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
        header = read_header(path)
        assert torch.equal(decode(path), decode_image(data)), "refvision and torchvision decode differently"
        plain = median_seconds(lambda: decode_image(data), args.repeat)
        checked = median_seconds(lambda: decode(path), args.repeat)

        def checked_torchvision() -> torch.Tensor:
            file = np.fromfile(path, dtype=np.uint8)
            _check_png_rows(path, _png_chunks(path, memoryview(file))[0], read_header(path), interlaced=False)
            return decode_image(torch.from_numpy(file))

        check = median_seconds(checked_torchvision, args.repeat)
        size = path.stat().st_size
    print(
        f"{args.width} x {args.height} RGB PNG, {size / 1e6:.2f} MB ({header.bit_depth}-bit), {args.threads} thread(s)"
    )
    print(f"{'':<24}{'torchvision decode_image':<28}{'refvision decode (Pillow)':<28}check + torchvision")
    print(f"{'median time (ms)':<24}{plain * 1e3:<28.1f}{checked * 1e3:<28.1f}{check * 1e3:.1f}")
    print(f"{'ratio to torchvision':<24}{1:<28.2f}{checked / plain:<28.2f}{check / plain:.2f}")


if __name__ == "__main__":
    main()
