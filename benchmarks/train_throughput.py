"""Training-step throughput at the real sizes: images/s and peak memory, data loader excluded, then included.

Models, as their configs (configs/detection, configs/segmentation) build them, without pretrained
weights: SSDLite320-MobileNetV3-Large and SSD300-VGG16 at batch 32, DeepLabV3+ MobileNetV2 and
ResNet-50 (output stride 8) on 512x1024 crops at batch 8. Forms: baseline, RefConv
(configs/conv/refconv.yaml) and DRConv (configs/conv/drconv.yaml: the 1x1 convs; SSD300-VGG16's
``backbone.features`` has none, so its DRConv form converts those of the whole ``backbone``).
Each form runs fp32 (PyTorch's defaults: cuDNN may use TF32 for convs) and bf16 autocast, with
``model.channels_last`` off and on, cuDNN's autotuner on (``--trainer.benchmark true``).

A step is forward, loss, backward and an SGD update (momentum 0.9), as the task's
``training_step`` computes the loss. "Loader excluded" repeats one batch already on the device;
"loader included" takes every batch from a DataLoader over the data module's training set
(the real decoding and augmentation, on generated VOC / Cityscapes files of the real image
sizes, the config's worker count, pinned memory, a sampler with replacement so no epoch ends)
and copies it to the device inside the timed step. Rows report the median step as images/s and
the peak of ``torch.cuda.max_memory_allocated`` over both runs. Step counts are capped by a time
budget shared among the (model, form) groups, so the table ends in a known time; a row that
fails (out of memory, say) is reported as such and the others go on.

    python benchmarks/train_throughput.py --device cuda [--out FILE.md] [--json FILE] [--budget 240] [--dry-run]

``--dry-run`` walks every row on tiny data and sizes (batch 2, one step each, no warm-up), prints
the traceback of every failure and exits with status 1 if a row failed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler, default_collate

from refvision.app.demo.data import write_cityscapes, write_vocdevkit
from refvision.data.cityscapes import CityscapesDataModule
from refvision.data.voc import VOCDataModule
from refvision.surgery.convert import conversion_report
from refvision.tasks.base import RefvisionTask
from refvision.tasks.detection import DetectionTask
from refvision.tasks.segmentation import SegmentationTask

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked network: its config file and batch size."""

    name: str
    config: str
    batch: int
    drconv_include: tuple[str, ...] | None = None
    """``conv.include`` of the DRConv form where the task's default scope has no 1x1 conv."""


MODELS = (
    ModelSpec("SSDLite320-MobileNetV3", "configs/detection/ssdlite320_mobilenet_v3_large_voc0712.yaml", 32),
    ModelSpec("SSD300-VGG16", "configs/detection/ssd300_vgg16_voc0712.yaml", 32, ("backbone.*",)),
    ModelSpec("DeepLabV3+ MobileNetV2", "configs/segmentation/deeplabv3plus_mobilenet_v2_cityscapes.yaml", 8),
    ModelSpec("DeepLabV3+ ResNet-50", "configs/segmentation/deeplabv3plus_resnet50_cityscapes.yaml", 8),
)
FORMS = {"baseline": None, "RefConv": "configs/conv/refconv.yaml", "DRConv": "configs/conv/drconv.yaml"}
PRECISIONS = ("fp32", "bf16")
SEGMENTATION_CROP = (512, 1024)


@dataclass
class Row:
    """One line of the table; ``note`` says why a row has no numbers."""

    model: str
    form: str
    precision: str
    channels_last: bool
    batch: int
    converted: int = 0
    excluded: float | None = None
    included: float | None = None
    peak_bytes: int | None = None
    note: str = ""


@dataclass
class Settings:
    """Sizes and step counts: the real ones, or the dry run's."""

    dry_run: bool
    budget_s: float
    warmup: int = 2
    steps: int = 5
    data_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def make(cls, dry_run: bool, budget_s: float) -> Settings:
        if dry_run:
            return cls(True, budget_s, warmup=0, steps=1, data_sizes={"voc": (48, 64), "cityscapes": (64, 128)})
        return cls(False, budget_s, data_sizes={"voc": (375, 500), "cityscapes": (1024, 2048)})

    def batch(self, spec: ModelSpec) -> int:
        return 2 if self.dry_run else spec.batch

    @property
    def crop(self) -> tuple[int, int]:
        return (64, 128) if self.dry_run else SEGMENTATION_CROP


def _model_args(path: str) -> dict[str, Any]:
    return yaml.safe_load((REPO / path).read_text())["model"]


def build_task(spec: ModelSpec, form: str, settings: Settings) -> RefvisionTask:
    """The task of ``spec``'s config in ``form`` (conv and trainable from the conv config)."""
    config = _model_args(spec.config)
    args = {k: v for k, v in config["init_args"].items() if k != "optim"}
    if FORMS[form] is not None:
        conv_args = _model_args(FORMS[form])["init_args"]
        args["conv"] = dict(conv_args["conv"])
        args["trainable"] = conv_args["trainable"]
        if form == "DRConv" and spec.drconv_include:
            args["conv"]["include"] = list(spec.drconv_include)
    if config["class_path"].endswith("DetectionTask"):
        return DetectionTask(num_classes=21, **args)
    return SegmentationTask(num_classes=19, example_size=settings.crop, **args)


def _data_args(spec: ModelSpec) -> dict[str, Any]:
    return yaml.safe_load((REPO / spec.config).read_text())["data"]["init_args"]


def write_data(root: Path, settings: Settings) -> dict[str, Path]:
    """Generated VOC and Cityscapes trees at the real image sizes (tiny for the dry run)."""
    voc_count, cityscapes_count = (8, 4) if settings.dry_run else (64, 8)
    voc = write_vocdevkit(root / "VOCdevkit", num_train=voc_count, num_test=2, size=settings.data_sizes["voc"])
    cityscapes = write_cityscapes(
        root / "cityscapes", num_train=cityscapes_count, num_val=1, size=settings.data_sizes["cityscapes"]
    )
    return {"voc": voc, "cityscapes": cityscapes}


def make_loader(spec: ModelSpec, data: dict[str, Path], settings: Settings, pin: bool) -> DataLoader:
    """The training set of the config's data module, batched as its loader batches it, endlessly."""
    args = _data_args(spec)
    workers = 2 if settings.dry_run else int(args.get("num_workers", 4))
    if "voc" in spec.config:
        module = VOCDataModule(
            str(data["voc"]),
            train_sets=["2007-trainval"],
            val_sets=["2007-test"],
            test_sets=["2007-test"],
            preset=args["preset"],
            num_workers=workers,
        )
    else:
        module = CityscapesDataModule(str(data["cityscapes"]), crop_size=settings.crop, num_workers=workers)
    module.setup("fit")
    sampler = RandomSampler(module.train_set, replacement=True, num_samples=1 << 30)
    return DataLoader(
        module.train_set,
        batch_size=settings.batch(spec),
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin,
        persistent_workers=workers > 0,
        collate_fn=module.collate_fn or default_collate,
    )


def loss_of(task: RefvisionTask, batch: Any) -> Tensor:
    """The training loss of ``batch``, as the task's ``training_step`` computes it (without logging)."""
    if isinstance(task, DetectionTask):
        images, targets = batch
        return sum(task.model(images, targets).values())
    images, masks = batch
    return task.loss(task.model(task.normalize(images)), masks)


def to_device(batch: Any, device: torch.device) -> Any:
    return apply_to_collection(batch, Tensor, lambda t: t.to(device, non_blocking=True))


def _autocast(device: torch.device, precision: str) -> AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step: Callable[[], None], device: torch.device, settings: Settings, deadline: float) -> list[float]:
    """``settings.warmup`` untimed steps, then up to ``settings.steps`` timed ones (at least one), fewer
    once ``deadline`` (``time.perf_counter``) has passed."""
    for _ in range(settings.warmup):
        step()
    _sync(device)
    times: list[float] = []
    while len(times) < settings.steps and (not times or time.perf_counter() < deadline):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def train_step(
    task: RefvisionTask,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    precision: str,
    batch: Callable[[], Any],
) -> None:
    """One training step on the batch ``batch()`` gives (on ``device``)."""
    inputs = task.on_after_batch_transfer(batch(), 0)
    with _autocast(device, precision):
        loss = loss_of(task, inputs)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def failure_note(err: Exception, settings: Settings) -> str:
    """The table's note for a row that failed with ``err``; the dry run also prints the traceback."""
    if settings.dry_run:
        traceback.print_exception(err, file=sys.stderr)
    if isinstance(err, torch.OutOfMemoryError):
        return "out of memory"
    return f"error: {type(err).__name__}: {str(err).splitlines()[0][:160]}"


def measure_form(
    spec: ModelSpec,
    form: str,
    settings: Settings,
    device: torch.device,
    loader_batches: Iterator[Any],
    deadline: float,
) -> list[Row]:
    """The four rows (fp32 / bf16 x channels_last off / on) of ``spec`` in ``form``."""
    torch.manual_seed(0)
    task = build_task(spec, form, settings).to(device).train()
    converted = len(conversion_report(task.model))
    fixed = to_device(next(loader_batches), device)
    rows = []
    configs = [(p, cl) for p in PRECISIONS for cl in (False, True)]
    for index, (precision, channels_last) in enumerate(configs):
        row = Row(spec.name, form, precision, channels_last, settings.batch(spec), converted)
        rows.append(row)
        left = deadline - time.perf_counter()
        if left <= 0:
            row.note = "not run: time budget spent"
            continue
        task.channels_last = channels_last
        task.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        optimizer = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
        each = left / (2 * (len(configs) - index))
        step = partial(train_step, task, optimizer, device, precision)
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            excluded = timed_steps(partial(step, lambda: fixed), device, settings, time.perf_counter() + each)
            included = timed_steps(
                partial(step, lambda: to_device(next(loader_batches), device)),
                device,
                settings,
                time.perf_counter() + each,
            )
        except Exception as err:  # noqa: BLE001  one failing row must not lose the others
            row.note = failure_note(err, settings)
        else:
            row.excluded = row.batch / statistics.median(excluded)
            row.included = row.batch / statistics.median(included)
            if device.type == "cuda":
                row.peak_bytes = torch.cuda.max_memory_allocated(device)
        finally:
            optimizer.zero_grad(set_to_none=True)
            del optimizer, step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    del task
    return rows


def run(device: torch.device, settings: Settings, progress: Callable[[str], None]) -> list[Row]:
    """Every row, within ``settings.budget_s`` seconds (data generation and model builds included)."""
    deadline = time.perf_counter() + settings.budget_s
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="refvision-throughput-") as tmp:
        progress("writing generated VOC and Cityscapes files")
        data = write_data(Path(tmp), settings)
        groups = [(spec, form) for spec in MODELS for form in FORMS]
        loader: DataLoader | None = None
        batches: Iterator[Any] = iter(())
        for index, (spec, form) in enumerate(groups):
            left = deadline - time.perf_counter()
            if left <= 0:
                rows += [
                    Row(spec.name, form, p, cl, settings.batch(spec), note="not run: time budget spent")
                    for p in PRECISIONS
                    for cl in (False, True)
                ]
                continue
            if loader is None or groups[index - 1][0] != spec:
                del loader, batches  # one model's loader workers alive at a time
                loader = make_loader(spec, data, settings, pin=device.type == "cuda")
                batches = iter(loader)
            group_deadline = time.perf_counter() + left / (len(groups) - index)
            progress(f"{spec.name}, {form}")
            try:
                rows += measure_form(spec, form, settings, device, batches, group_deadline)
            except Exception as err:  # noqa: BLE001  a form that cannot be built is one failed group
                note = failure_note(err, settings)
                rows += [
                    Row(spec.name, form, p, cl, settings.batch(spec), note=note)
                    for p in PRECISIONS
                    for cl in (False, True)
                ]
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del loader, batches
    return rows


def markdown(rows: list[Row]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| model | form (convs converted) | batch | precision | channels_last | images/s, loader excluded "
        "| images/s, loader included | peak GiB | note |",
        "|---|---|---:|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        form = r.form if r.form == "baseline" else f"{r.form} ({r.converted})"
        numbers = [f"{v:.1f}" if v is not None else "" for v in (r.excluded, r.included)]
        peak = f"{r.peak_bytes / 2**30:.2f}" if r.peak_bytes is not None else ""
        cl = "on" if r.channels_last else "off"
        lines.append(
            f"| {r.model} | {form} | {r.batch} | {r.precision} | {cl} | {' | '.join(numbers)} | {peak} | {r.note} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget", type=float, default=240.0, help="seconds for the whole table")
    parser.add_argument("--out", type=Path, help="write the markdown table here too")
    parser.add_argument("--json", type=Path, help="write the rows here as JSON")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, one step each; fail if a row fails")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device is present")
    torch.backends.cudnn.benchmark = True
    rows = run(device, Settings.make(args.dry_run, args.budget), lambda s: print(s, file=sys.stderr, flush=True))
    table = markdown(rows)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=1))
    if args.dry_run and any(failed(row) for row in rows):
        sys.exit(1)


def failed(row: Row) -> bool:
    """Whether ``row`` failed (rather than ran, or was left out for lack of time)."""
    return row.note.startswith(("error", "out of memory"))


if __name__ == "__main__":
    main()
