"""SSDLite320 (MobileNetV3-Large) training-step time: plain baseline vs RefConv form, side by side.

Both models are built by ``DetectionTask`` (no pretrained weights, so torchvision uses the
MobileNetV3 "reduced tail"); the RefConv one has every k x k conv of ``backbone.features``
converted and trains everything but the frozen bases (configs/conv/refconv.yaml). One step is
forward + SSD loss + backward + SGD update on the same synthetic batch; the two models
alternate step by step, and the script prints the median step time of each and their ratio.

    python benchmarks/detection_step.py [--steps 10] [--warmup 2] [--batch 8] [--size 320] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import Tensor

from refvision.surgery.convert import conversion_report
from refvision.tasks.detection import DetectionTask


def synthetic_batch(batch: int, size: int, device: torch.device) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """``batch`` random ``(3, size, size)`` images with 1-3 random boxes each (labels 1..20)."""
    generator = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(batch):
        count = int(torch.randint(1, 4, (), generator=generator))
        corner = torch.rand(count, 2, generator=generator) * size * 0.6
        extent = (0.1 + 0.3 * torch.rand(count, 2, generator=generator)) * size
        boxes = torch.cat([corner, corner + extent], dim=1)
        labels = torch.randint(1, 21, (count,), generator=generator)
        images.append(torch.rand(3, size, size, generator=generator).to(device))
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


def _step(
    task: DetectionTask,
    optimizer: torch.optim.Optimizer,
    images: list[Tensor],
    targets: list[dict[str, Tensor]],
    device: torch.device,
) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    loss = sum(task.model(images, targets).values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    forms = {}
    for name, options in (
        ("baseline", {}),
        ("refconv", {"conv": {"kind": "refconv", "select": "kxk"}, "trainable": "all_but_basis"}),
    ):
        torch.manual_seed(0)
        task = (
            DetectionTask(detector="ssdlite320_mobilenet_v3_large", image_size=args.size, **options).to(device).train()
        )
        params = [p for p in task.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=4e-5)
        forms[name] = (task, optimizer, sum(p.numel() for p in params))
    images, targets = synthetic_batch(args.batch, args.size, device)

    times: dict[str, list[float]] = {name: [] for name in forms}
    for index in range(args.warmup + args.steps):
        for name, (task, optimizer, _) in forms.items():
            elapsed = _step(task, optimizer, images, targets, device)
            if index >= args.warmup:
                times[name].append(elapsed)

    converted = len(conversion_report(forms["refconv"][0].model))
    print(
        f"SSDLite320 MobileNetV3-Large, batch {args.batch} at {args.size}x{args.size}, {device}, "
        f"{torch.get_num_threads()} threads; median of {args.steps} steps after {args.warmup} warm-up, interleaved"
    )
    print(f"RefConv form: {converted} k x k convs of backbone.features converted")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, (_, _, trainable) in forms.items():
        print(f"  {name:9} {1000 * medians[name]:9.1f} ms/step   ({trainable:,} trainable parameters)")
    print(f"  ratio refconv / baseline: {medians['refconv'] / medians['baseline']:.2f}")


if __name__ == "__main__":
    main()
