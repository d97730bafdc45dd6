"""Training-step time of DeepLabV3+ MobileNetV2: baseline vs RefConv form, side by side in one run.

Both models are built from the same weights; RefConv converts every k x k conv of the encoder
(the task's default scope). Steps alternate between the two so both see the same machine state;
the medians and their ratio are printed. Run: ``python benchmarks/segmentation_step.py``.
"""

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from refvision import convert
from refvision.models import build_segmenter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, nargs=2, default=(256, 512))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()

    torch.manual_seed(0)
    baseline = build_segmenter("mobilenet_v2", 19, None, 8)
    refconv = convert(copy.deepcopy(baseline), "refconv", select="kxk", include=["encoder.*"])
    images = torch.randn(args.batch, 3, *args.size)
    masks = torch.randint(0, 19, (args.batch, *args.size))
    runs = {}
    for name, model in (("baseline", baseline), ("refconv", refconv)):
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        runs[name] = (model, optimizer)

    def step(name: str) -> float:
        model, optimizer = runs[name]
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), masks, ignore_index=255).backward()
        optimizer.step()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.warmup + args.steps):
        for name in runs:
            elapsed = step(name)
            if i >= args.warmup:
                times[name].append(elapsed)
    base, ref = (statistics.median(times[n]) for n in ("baseline", "refconv"))
    print(
        f"DeepLabV3+ MobileNetV2 (OS 8), batch {args.batch} at {args.size[0]}x{args.size[1]}, "
        f"{torch.get_num_threads()} threads, median of {args.steps} steps"
    )
    print(f"baseline step  {base:.3f} s")
    print(f"RefConv step   {ref:.3f} s")
    print(f"ratio RefConv / baseline  {ref / base:.2f}")


if __name__ == "__main__":
    main()
