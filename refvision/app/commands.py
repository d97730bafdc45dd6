"""The workflow subcommands of ``refvision``: reparameterize, profile, export, demo."""

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jsonargparse import ActionConfigFile, ArgumentParser

from refvision.app.demo.run import run_demo
from refvision.app.lightning_cli import yaml_mapping
from refvision.checkpoints.deploy import forms_table, load_task_checkpoint, reparameterize_checkpoint
from refvision.export.formats import FORMATS, export_checkpoint
from refvision.surgery.convert import reparameterize
from refvision.surgery.latency import describe_latency_setup, measure_latencies
from refvision.surgery.profile import profile
from refvision.tasks.base import RefvisionTask


def reparameterize_command(argv: Sequence[str]) -> None:
    parser = ArgumentParser(
        prog="refvision reparameterize", description="Write the deploy checkpoint of a trained checkpoint."
    )
    parser.add_argument("--ckpt", required=True, help="trained checkpoint (loaded with weights_only=True)")
    parser.add_argument("--output", required=True, help="deploy checkpoint to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    cfg = parser.parse_args(list(argv))
    print(reparameterize_checkpoint(cfg.ckpt, cfg.output, overwrite=cfg.overwrite))


def build_task_from_configs(configs: Sequence[str]) -> RefvisionTask:
    """Instantiate the ``model`` of composed ``-c`` configs without touching data or trainer: every other
    top-level key of the configs is read and left unused."""
    parser = ArgumentParser(prog="refvision profile")
    parser.add_argument("-c", "--config", action=ActionConfigFile)
    parser.add_subclass_arguments(RefvisionTask, "model")
    for ignored in dict.fromkeys(key for path in configs for key in yaml_mapping(path) if key != "model"):
        parser.add_argument(f"--{ignored}", type=Any)
    cfg = parser.parse_args([arg for path in configs for arg in ("-c", path)])
    return parser.instantiate_classes(cfg).model


def profile_command(argv: Sequence[str]) -> None:
    parser = ArgumentParser(
        prog="refvision profile", description="Parameters, FLOPs and latency of train and deploy form."
    )
    parser.add_argument("-c", "--config", action="append", default=[], help="task config(s), composed in order")
    parser.add_argument("--ckpt", help="a trained checkpoint, instead of the configs (it builds its own task)")
    parser.add_argument("--device", default="cpu", help="where both forms run and are timed (cpu, cuda, cuda:1, ...)")
    parser.add_argument(
        "--input_size",
        type=list[int] | None,
        default=None,
        help="input height and width, e.g. [512, 1024] (default: the task's example input)",
    )
    parser.add_argument(
        "--min_run_time", type=float, default=1.0, help="seconds of timed forward passes at least (all forms)"
    )
    parser.add_argument(
        "--max_run_time", type=float, default=20.0, help="seconds at most: a spread still wider is reported as noisy"
    )
    parser.add_argument(
        "--spread", type=float, default=0.05, help="target IQR of the latency as a fraction of its median"
    )
    cfg = parser.parse_args(list(argv))
    if not cfg.config and not cfg.ckpt:
        parser.error("give -c CONFIG or --ckpt CKPT")
    if cfg.config and cfg.ckpt:
        raise ValueError(
            f"-c {' -c '.join(cfg.config)} and --ckpt {cfg.ckpt}: give one, not both; the "
            "checkpoint's hyper-parameters build its task, so the configs would be ignored"
        )
    if cfg.input_size is not None and (len(cfg.input_size) != 2 or min(cfg.input_size) < 1):
        raise ValueError(f"--input_size {cfg.input_size}: expected [height, width], two positive integers")
    if not 0 < cfg.min_run_time <= cfg.max_run_time or cfg.spread <= 0:
        raise ValueError(
            f"--min_run_time {cfg.min_run_time}, --max_run_time {cfg.max_run_time}, --spread {cfg.spread}: expected "
            "0 < min_run_time <= max_run_time and a positive spread"
        )
    device = usable_device(cfg.device)
    task = load_task_checkpoint(cfg.ckpt)[0] if cfg.ckpt else build_task_from_configs(cfg.config)
    timing = {"min_run_time": cfg.min_run_time, "max_run_time": cfg.max_run_time, "spread": cfg.spread}
    print(profile_table(task, device=device, input_size=cfg.input_size, **timing))


def usable_device(name: str) -> torch.device:
    """The torch device ``name`` (``cpu``, ``cuda``, ``cuda:1``, ...), if this machine has it.

    Raises:
        ValueError: ``name`` is not a device name, or names a device that is not here.
    """
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device name; expected cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ValueError(
                f"--device {name}: no CUDA GPU is usable here (torch.cuda.device_count() is 0); expected cpu"
            )
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"--device {name}: this machine has {count} CUDA GPU(s); expected cpu or cuda:0 to cuda:{count - 1}"
            )
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError):
            raise ValueError(f"--device {name}: PyTorch cannot use it on this machine; expected cpu or cuda") from None
    return device


def profile_table(
    task: RefvisionTask,
    min_run_time: float = 1.0,
    *,
    device: str | torch.device = "cpu",
    input_size: Sequence[int] | None = None,
    progress: Callable[[str], None] | None = None,
    max_run_time: float = 20.0,
    spread: float = 0.05,
) -> str:
    """Params / FLOPs / latency (median and IQR, ms, batch of ``example_inputs``) of both forms on
    ``device``, then a line saying the input, batch, threads, device and whether the latency is noisy
    (:func:`~refvision.surgery.latency.measure_latencies` with ``min_run_time``, ``max_run_time``, ``spread``).

    ``input_size`` ``(H, W)`` replaces the example input's spatial size. ``progress`` (default: a
    line on stderr) is told what runs, since a large model takes minutes on a CPU.
    """
    say = progress or (lambda line: print(f"refvision profile: {line}", file=sys.stderr, flush=True))
    device = torch.device(device)
    task = task.eval().to(device)
    inputs = _to_device(_resized(task.example_inputs(), input_size), device)
    train_module = task.profile_module()
    say("re-parameterizing")
    original, task.model = task.model, reparameterize(task.model)
    deploy_module = task.profile_module()
    task.model = original
    profiles = []
    for name, module in (("train", train_module), ("deploy", deploy_module)):
        say(f"counting FLOPs of the {name} form")
        profiles.append(profile(module, inputs=inputs))
    forms = {"train": train_module, "deploy": deploy_module}
    timing = {"spread": spread, "min_run_time": min_run_time, "max_run_time": max_run_time}
    latency = measure_latencies(forms, inputs, progress=say, **timing)
    table = forms_table(
        *profiles,
        (f"latency ms (median, {device.type})", *(f"{latency[f].median_ms:.2f}" for f in forms)),
        ("latency ms (IQR)", *(f"{latency[f].iqr_ms:.2f}" for f in forms)),
    )
    return f"{table}\n{describe_latency_setup(inputs, device, latency, spread)}"


def _resized(inputs: Any, size: Sequence[int] | None) -> Any:
    """The example input (a ``(B, 3, H, W)`` tensor or a list of ``(3, H, W)`` images) at ``size``."""
    if size is None:
        return inputs
    if isinstance(inputs, torch.Tensor):
        return torch.randn(*inputs.shape[:-2], *size, dtype=inputs.dtype)
    return [torch.rand(*image.shape[:-2], *size, dtype=image.dtype) for image in inputs]


def _to_device(inputs: Any, device: torch.device) -> Any:
    return inputs.to(device) if isinstance(inputs, torch.Tensor) else [t.to(device) for t in inputs]


def demo_command(argv: Sequence[str]) -> None:
    parser = ArgumentParser(
        prog="refvision demo", description="Baseline, control and RefConv refocusing on generated data."
    )
    parser.add_argument("--root", default="runs/demo", help="run directory (data is cached under ROOT/data)")
    parser.add_argument("--tasks", type=list[str], default=["classification", "detection", "segmentation"])
    cfg = parser.parse_args(list(argv))
    run_demo(cfg.root, cfg.tasks)


def export_command(argv: Sequence[str]) -> None:
    parser = ArgumentParser(
        prog="refvision export",
        description=(
            "Export the deploy form of a checkpoint's network (RefConv folded into plain convs, DRConv in its "
            "inference form). The graph takes images (batch, 3, height, width), float32 RGB in [0, 1], and "
            "normalises them inside. The batch is dynamic; height and width too for classification, segmentation "
            "with inference: whole, and detection (resized inside). The file carries its description: task, "
            "class names, mean / std, input size, dynamic axes, opset, conv method, source checkpoint, refvision "
            "version (ONNX metadata_props; refvision.json in .pt / .pt2 files)."
        ),
    )
    parser.add_argument("--ckpt", required=True, help="train or deploy checkpoint (loaded with weights_only=True)")
    parser.add_argument("--output", required=True, help="file to write (.onnx, .pt, .pt2)")
    parser.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="onnx (torch.onnx.export, dynamo first) | torchscript (torch.jit.trace: fixed shapes) | "
        "exported-program (torch.export, .pt2)",
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset version")
    parser.add_argument(
        "--postprocess",
        type=bool,
        default=False,
        help="detection, ONNX only: end the graph in box decoding, score threshold and per-class NMS (ONNX "
        "NonMaxSuppression), as torchvision's SSD in eval mode. Outputs boxes (batch, max_det, 4) xyxy in input "
        "pixels, scores (batch, max_det), labels (batch, max_det) int64, num_detections (batch,): image i's "
        "detections are its first num_detections[i] rows, the rest zeros; max_det is the detector's detections_per_img "
        "(200). Default false: the raw head outputs "
        "(batch, anchors * (4 + classes))",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument(
        "--check",
        type=bool,
        default=True,
        help="run the written file (ONNX: onnxruntime) at two batch sizes and, where dynamic, two image sizes, and "
        "compare it with PyTorch; on a difference above 1e-4 x max(1, max |output|) nothing is written",
    )
    cfg = parser.parse_args(list(argv))
    print(
        export_checkpoint(
            cfg.ckpt,
            cfg.output,
            cfg.format,
            opset=cfg.opset,
            overwrite=cfg.overwrite,
            check=cfg.check,
            postprocess=cfg.postprocess,
        )
    )


EXTRA_COMMANDS: dict[str, Callable[[Sequence[str]], None]] = {
    "reparameterize": reparameterize_command,
    "profile": profile_command,
    "demo": demo_command,
    "export": export_command,
}
