"""DRConv beside nn.Conv2d of the same shape and the dense reference, one run, side by side.

For each shape: median times of the plain conv, DRConv (training: forward + backward; eval:
forward under ``no_grad``), its deploy form (``fuse()``) and the dense reference (all ``m``
region outputs computed, then selected; the one the tests check DRConv against,
tests/drconv_reference.py), all on the same input, alternating within each repetition. Ratios
are printed beside the times. "group GEMMs alone" times only the region conv's multiplications,
one GEMM per (sample, region) group on patch rows and filters prepared beforehand: a floor for
any layer that multiplies each group by its own filter with a library GEMM. Memory: bytes saved
for backward, and the peak of the memory allocated during forward + backward (CUDA: the
allocator's peak; CPU: the live storages every op leaves, tracked by a dispatch mode), each
against the plain conv.

    python benchmarks/drconv_vs_dense.py [--reps 7] [--device cpu|cuda|all] [--threads N]
                                         [--form residual|paper] [--dry-run]

``--dry-run``: one tiny shape, one repetition (walks the script on CPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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
TINY_SHAPES = [("3x3 8->8 @12x12", 2, 8, 8, 3, 1, 12)]


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _saved_bytes(forward: Callable[[], Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward (distinct storages)."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages created under it and still alive, checked after every op
    (CPU has no allocator statistics). Views share their storage and count once."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[key]
        for tensor in tree_leaves(out):
            if isinstance(tensor, Tensor):
                storage = tensor.untyped_storage()
                if storage.nbytes() and storage.data_ptr() not in self.live:
                    self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return out


def _peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    if device.type != "cuda":
        with _LiveBytes() as live:
            step()
        return live.peak
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _group_gemms(conv: DRConv, x: Tensor) -> Callable[[], None]:
    """The region conv's GEMMs alone: pixels sorted by region (``F.unfold`` patches), one
    ``torch.mm`` per (sample, region) group with that group's filter; everything else is
    prepared here, untimed."""
    with torch.no_grad():
        guide = F.conv2d(x, conv.guide_weight, conv.guide_bias, conv.stride, conv.padding, conv.dilation)
        region = guide.argmax(1).flatten(1)  # (B, P)
        patches = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride).transpose(1, 2)
        order = region.argsort(dim=1, stable=True).unsqueeze(-1).expand_as(patches)
        rows = patches.gather(1, order).contiguous()  # (B, P, Cin*kh*kw), grouped by region
        kernels = conv.generator(x, conv.weight).flatten(3).contiguous()  # (B, m, Cout, Cin*kh*kw)
        counts = [torch.bincount(r, minlength=conv.regions).tolist() for r in region]
        out = rows.new_empty(*rows.shape[:2], kernels.shape[2])

    def run() -> None:
        for sample, sizes in enumerate(counts):
            groups = zip(rows[sample].split(sizes), out[sample].split(sizes), kernels[sample])
            for group_rows, group_out, kernel in groups:
                if group_rows.shape[0]:
                    torch.mm(group_rows, kernel.t(), out=group_out)

    return run


def _bench_shape(shape: tuple, device: torch.device, reps: int, residual: bool) -> dict[str, dict]:
    _, batch, cin, cout, k, padding, size = shape
    torch.manual_seed(0)
    plain = nn.Conv2d(cin, cout, k, padding=padding, device=device)
    conv = DRConv.from_conv(plain, regions=REGIONS, residual=residual)
    with torch.no_grad():  # a trained-looking generator, so regions really differ
        conv.generator.expand_weight.normal_(0.0, 0.05)
    deploy = conv.fuse().eval()
    x = torch.randn(batch, cin, size, size, device=device, requires_grad=True)
    grad_out = torch.randn(batch, cout, size, size, device=device)

    trained: dict[str, Callable[[], Tensor]] = {
        "conv": lambda: plain(x),
        "drconv": lambda: conv(x),
        "dense": lambda: dense_drconv(conv, x).out,
    }
    inference: dict[str, Callable[[], object]] = {
        "conv": lambda: plain(x),
        "drconv": lambda: conv(x),
        "deploy": lambda: deploy(x),
        "gemms": _group_gemms(conv, x.detach()),
    }
    times: dict[str, list[float]] = {}
    for rep in range(reps + 1):  # the first round warms up
        for name, forward in trained.items():
            conv.zero_grad(set_to_none=True)
            plain.zero_grad(set_to_none=True)
            x.grad = None
            took = _timed(lambda forward=forward: forward().backward(grad_out), device)
            if rep:
                times.setdefault(f"train/{name}", []).append(took)
        with torch.no_grad():
            for name, forward in inference.items():
                took = _timed(forward, device)
                if rep:
                    times.setdefault(f"eval/{name}", []).append(took)
    result = {"time": {key: statistics.median(v) for key, v in times.items()}}
    result["saved"] = {name: _saved_bytes(trained[name]) for name in ("conv", "drconv", "dense")}
    result["peak"] = {}
    for name, forward in trained.items():  # gradients start unallocated, as in the timed runs
        conv.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
        x.grad = None
        result["peak"][name] = _peak_bytes(lambda f=forward: f().backward(grad_out), device)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions (median is shown)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    parser.add_argument(
        "--form",
        choices=["residual", "paper"],
        default="residual",
        help="residual: the function-preserving residual variant; paper: the paper's layer",
    )
    parser.add_argument("--dry-run", action="store_true", help="one tiny shape, one repetition")
    args = parser.parse_args()
    shapes = TINY_SHAPES if args.dry_run else SHAPES
    if args.dry_run:
        args.reps = 1
    if args.threads:
        torch.set_num_threads(args.threads)

    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    if args.device == "cuda" and not devices:
        parser.error("CUDA is not available")

    form = "residual variant" if args.form == "residual" else "paper's layer"
    print(f"DRConv ({form}), m={REGIONS}, float32, median of {args.reps}; x = time / nn.Conv2d's")
    for device in devices:
        name = (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
        )
        print(f"# {name}")
        for shape in shapes:
            r = _bench_shape(shape, device, args.reps, args.form == "residual")
            t, saved, peak = r["time"], r["saved"], r["peak"]
            conv_train, conv_eval = t["train/conv"], t["eval/conv"]
            print(f"{shape[0]}, batch {shape[1]}")
            print(
                f"  fwd+bwd   conv {conv_train * 1e3:8.2f} ms | DRConv {t['train/drconv'] / conv_train:5.2f}x"
                f" | dense {t['train/dense'] / conv_train:5.2f}x"
                f" | DRConv vs dense: {t['train/dense'] / t['train/drconv']:.2f}x faster"
            )
            print(
                f"  eval      conv {conv_eval * 1e3:8.2f} ms | DRConv {t['eval/drconv'] / conv_eval:5.2f}x"
                f" | deploy form {t['eval/deploy'] / conv_eval:5.2f}x"
                f" | group GEMMs alone {t['eval/gemms'] / conv_eval:5.2f}x"
            )
            print(
                f"  memory    saved for backward: conv {saved['conv'] / 2**20:.1f} MiB"
                f" | DRConv {saved['drconv'] / saved['conv']:.2f}x | dense {saved['dense'] / saved['conv']:.2f}x"
                f"; peak fwd+bwd: conv {peak['conv'] / 2**20:.1f} MiB"
                f" | DRConv {peak['drconv'] / peak['conv']:.2f}x | dense {peak['dense'] / peak['conv']:.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
