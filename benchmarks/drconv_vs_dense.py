"""DRConv vs the dense reference (all m region outputs computed, then selected), side by side.

Both run on the same module and input, alternating within each repetition; the script
prints the median forward and forward+backward times and the dense/DRConv ratio.
The dense reference is the one the tests check DRConv against (tests/drconv_reference.py).

    python benchmarks/drconv_vs_dense.py [--reps 7] [--device cpu|cuda|all] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from drconv_reference import dense_drconv  # noqa: E402

from refvision.nn.drconv import DRConv  # noqa: E402

REGIONS = 8
# (name, batch, in, out, kernel, padding, size)
SHAPES = [
    ("3x3 64->64 @56x56", 8, 64, 64, 3, 1, 56),
    ("1x1 128->128 @28x28", 8, 128, 128, 1, 0, 28),
    ("1x1 232->232 @14x14", 32, 232, 232, 1, 0, 14),
]


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _bench_shape(
    shape: tuple[str, int, int, int, int, int, int], device: torch.device, reps: int
) -> dict[str, dict[str, float]]:
    _, batch, cin, cout, k, padding, size = shape
    torch.manual_seed(0)
    conv = DRConv(cin, cout, k, padding=padding, regions=REGIONS, device=device)
    with torch.no_grad():  # a trained-looking generator, so regions really differ
        conv.generator.expand_weight.normal_(0.0, 0.05)
    x = torch.randn(batch, cin, size, size, device=device, requires_grad=True)
    grad_out = torch.randn(batch, cout, size, size, device=device)

    methods: dict[str, Callable[[], Tensor]] = {
        "drconv": lambda: conv(x),
        "dense": lambda: dense_drconv(conv, x).out,
    }
    times: dict[str, dict[str, list[float]]] = {m: {"fwd": [], "fwd+bwd": []} for m in methods}
    for rep in range(reps + 1):  # the first round warms up
        for name, forward in methods.items():
            with torch.no_grad():
                fwd = _timed(forward, device)
            conv.zero_grad(set_to_none=True)
            x.grad = None
            both = _timed(lambda: forward().backward(grad_out), device)
            if rep:
                times[name]["fwd"].append(fwd)
                times[name]["fwd+bwd"].append(both)
    return {m: {k: statistics.median(v) for k, v in t.items()} for m, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions (median is shown)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if args.device == "cuda" and not devices:
        parser.error("CUDA is not available")

    print(f"m={REGIONS}, float32, median of {args.reps}; ratio = dense / DRConv (>1: faster)")
    header = (
        f"{'device':6s} {'shape':22s} {'B':>3s} | {'pass':8s} "
        f"{'DRConv ms':>10s} {'dense ms':>10s} {'ratio':>6s}"
    )
    print(header)
    print("-" * len(header))
    for device in devices:
        if device.type == "cuda":
            print(f"# {torch.cuda.get_device_name(device)}")
        else:
            print(f"# cpu, {torch.get_num_threads()} threads")
        for shape in SHAPES:
            name, batch = shape[:2]
            result = _bench_shape(shape, device, args.reps)
            for pass_name in ("fwd", "fwd+bwd"):
                ours, dense = result["drconv"][pass_name], result["dense"][pass_name]
                print(
                    f"{device.type:6s} {name:22s} {batch:3d} | {pass_name:8s} "
                    f"{ours * 1e3:10.2f} {dense * 1e3:10.2f} {dense / ours:6.2f}"
                )


if __name__ == "__main__":
    main()
