"""Export a task checkpoint's raw network to ONNX, TorchScript or a ``torch.export`` program.

What is exported is ``task.profile_module()`` in its deploy form: the network without loss or
post-processing (detection: backbone + head outputs, no box decoding / NMS; segmentation: logits
at the input size, no sliding window or test-time augmentation). A train-form checkpoint (RefConv
or DRConv training layers inside) is re-parameterized first, so the exported graph is the
original architecture (RefConv) or DRConv's inference form.
"""

import dataclasses
import importlib.util
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from refvision.checkpoints.deploy import load_task_to_write
from refvision.surgery.convert import converted_layers, reparameterize
from refvision.utils.atomic_file import written_atomically

ExportFormat = Literal["onnx", "torchscript", "exported-program"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript", "exported-program")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}
"""The conventional file suffix of each format (``torch.export.load`` warns about others)."""

RELATIVE_TOLERANCE = 1e-4
"""``check`` fails when max |exported - PyTorch| > ``RELATIVE_TOLERANCE * max(1, max |PyTorch|)``."""

EXPORT_BATCH = 2
"""Batch size of the export input: torch.export specializes dimensions of size 1, so a dynamic
batch needs an example with another size; the check then also runs the task's own example."""


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What :func:`export_checkpoint` wrote and how it compares to PyTorch.

    ``exporter`` names the call that produced the file (for ONNX, ``dynamo=True`` or the
    fallback ``dynamo=False`` with ``fallback_reason``). ``fold_max_abs_diff`` is the output gap
    between the train form and the exported deploy form (``None`` when the checkpoint already
    was in deploy form); ``max_abs_diff`` the gap between the exported file and the PyTorch
    deploy form over the checked batches, against ``tolerance`` (both ``None`` without check).
    """

    source: str
    output: str
    format: str
    exporter: str
    reparameterized: bool
    input_shapes: tuple[tuple[int, ...], ...]
    dynamic_batch: bool
    fold_max_abs_diff: float | None = None
    max_abs_diff: float | None = None
    tolerance: float | None = None
    fallback_reason: str | None = None

    def __str__(self) -> str:
        lines = []
        if self.reparameterized:
            lines.append(
                f"{self.source} is a train-form checkpoint: re-parameterized before export "
                f"(max |train - deploy| = {self.fold_max_abs_diff:.3e})"
            )
        if self.fallback_reason:
            lines.append(f"dynamo ONNX export failed ({self.fallback_reason}); used the TorchScript-based exporter")
        shapes = ", ".join("x".join(map(str, s)) for s in self.input_shapes)
        lines.append(
            f"exported with {self.exporter} on input {shapes}; batch dim {'dynamic' if self.dynamic_batch else 'fixed'}"
        )
        if self.max_abs_diff is not None:
            lines.append(
                f"check: max |{self.format} - PyTorch| = {self.max_abs_diff:.3e} (tolerance {self.tolerance:.1e})"
            )
        lines.append(f"wrote {self.output}")
        return "\n".join(lines)


def export_checkpoint(
    ckpt: str | os.PathLike,
    output: str | os.PathLike,
    format: ExportFormat,
    opset: int = 18,
    overwrite: bool = False,
    check: bool = True,
) -> ExportReport:
    """Export the deploy form of checkpoint ``ckpt``'s raw network to ``output``.

    Args:
        ckpt: a train or deploy checkpoint of any refvision task (loaded with ``weights_only=True``).
        output: file to write (by convention ``.onnx``, ``.pt``, ``.pt2``: :data:`SUFFIXES`); never the
            ``ckpt`` itself, even with ``overwrite``. Written atomically (``refvision.utils.atomic_file``) after
            the check, so a failure leaves no file.
        format: ``onnx`` (``torch.onnx.export``, dynamo first), ``torchscript``
            (``torch.jit.trace``) or ``exported-program`` (``torch.export.export`` + ``save``).
        opset: ONNX opset version.
        overwrite: replace an existing ``output``.
        check: load the written file, run it (ONNX: onnxruntime, CPU) on the export input
            ``(EXPORT_BATCH, ...)`` and, when the batch is dynamic, on ``task.example_inputs()``,
            and compare with PyTorch.

    The exported function takes what ``task.example_inputs()`` gives. A tensor example (the
    ``(1, 3, H, W)`` float32 images of classification and segmentation) is exported on
    :data:`EXPORT_BATCH` such examples with a dynamic batch dim, ONNX input name ``images``;
    any other example (detection's list of ``(3, S, S)`` images) is exported as it is, with fixed
    shapes. The outputs are those of ``task.profile_module()``, nested tuples, lists and dicts
    flattened in order, named ``output`` in ONNX (``output_0``, ``output_1``, ... when several).

    Raises:
        FileExistsError: ``output`` exists and not ``overwrite``.
        IsADirectoryError: ``output`` is a directory.
        ValueError: unknown ``format``; ``output`` is ``ckpt``; or a non-finite fold gap, or a check
            gap above the tolerance or NaN.
    """
    if format not in FORMATS:
        raise ValueError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    task, _ = load_task_to_write(ckpt, output, overwrite)
    source, output = str(ckpt), Path(output)
    example = task.example_inputs()
    reparameterized = bool(converted_layers(task.model))
    fold_gap = None
    if reparameterized:
        with torch.no_grad():
            train_out = task.raw_forward(task.model, example)
            task.model = reparameterize(task.model)
            fold_gap = _max_abs_diff(_flatten(train_out), _flatten(task.raw_forward(task.model, example)))
        if not math.isfinite(fold_gap):
            raise ValueError(f"{source}: max |train - deploy| is {fold_gap} (non-finite outputs); nothing exported")
    module = task.profile_module().eval()

    batched = isinstance(example, Tensor)
    inputs = torch.cat([example, *(task.example_inputs() for _ in range(EXPORT_BATCH - 1))]) if batched else example
    with torch.no_grad():
        n_outputs = len(_flatten(module(inputs)))
    output_names = ["output"] if n_outputs == 1 else [f"output_{i}" for i in range(n_outputs)]

    with written_atomically(output, suffix=SUFFIXES[format]) as tmp:
        exporter, dynamic, fallback, run = _EXPORTERS[format](module, inputs, tmp, batched, opset, output_names)
        gap = tolerance = None
        if check:
            checked = [inputs, example] if dynamic else [inputs]
            gap, tolerance = _check(module, run, checked, format)
    return ExportReport(
        source=str(source),
        output=str(output),
        format=format,
        exporter=exporter,
        reparameterized=reparameterized,
        input_shapes=tuple(tuple(x.shape) for x in _flatten(inputs)),
        dynamic_batch=dynamic,
        fold_max_abs_diff=fold_gap,
        max_abs_diff=gap,
        tolerance=tolerance,
        fallback_reason=fallback,
    )


Runner = Callable[[Any], list[Tensor]]
"""Loads the written file lazily and runs it on a model input, giving the flattened outputs."""
ExportResult = tuple[str, bool, str | None, Runner]
"""(exporter, dynamic batch, ONNX dynamo fallback reason, runner)."""


def _export_onnx(
    module: nn.Module, inputs: Any, path: Path, batched: bool, opset: int, output_names: list[str]
) -> ExportResult:
    _require("onnx", "onnxscript")
    names = {"input_names": ["images"] if batched else None, "output_names": output_names}
    try:
        torch.onnx.export(
            module,
            (inputs,),
            path,
            dynamo=True,
            opset_version=opset,
            external_data=False,
            verbose=False,
            dynamic_shapes=({0: torch.export.Dim("batch")},) if batched else None,
            **names,
        )
        exporter, fallback = "torch.onnx.export(dynamo=True)", None
    except Exception as err:  # noqa: BLE001  (any dynamo failure falls back; the reason is reported)
        fallback = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
        axes = {name: {0: "batch"} for name in ["images", *output_names]} if batched else None
        torch.onnx.export(module, (inputs,), path, dynamo=False, opset_version=opset, dynamic_axes=axes, **names)
        exporter = "torch.onnx.export(dynamo=False)"

    def run(x: Any) -> list[Tensor]:
        _require("onnxruntime")
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), _flatten(x))}
        return [torch.from_numpy(out) for out in session.run(None, feeds)]

    return exporter, batched, fallback, run


def _export_torchscript(
    module: nn.Module, inputs: Any, path: Path, batched: bool, opset: int, output_names: list[str]
) -> ExportResult:
    traced = torch.jit.trace(module, (inputs,), check_trace=False)
    torch.jit.save(traced, str(path))

    def run(x: Any) -> list[Tensor]:
        return _flatten(torch.jit.load(str(path), map_location="cpu")(x))

    # A trace records the shapes it saw; it is checked at the export batch only.
    return "torch.jit.trace", False, None, run


def _export_program(
    module: nn.Module, inputs: Any, path: Path, batched: bool, opset: int, output_names: list[str]
) -> ExportResult:
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if batched else None
    program = torch.export.export(module, (inputs,), dynamic_shapes=dynamic_shapes)
    torch.export.save(program, path)

    def run(x: Any) -> list[Tensor]:
        return _flatten(torch.export.load(path).module()(x))

    return "torch.export.export", batched, None, run


_EXPORTERS: dict[str, Callable[..., ExportResult]] = {
    "onnx": _export_onnx,
    "torchscript": _export_torchscript,
    "exported-program": _export_program,
}


def _check(module: nn.Module, run: Runner, batches: list[Any], format: str) -> tuple[float, float]:
    """Largest gap between ``run`` and ``module`` over ``batches``; raises above the tolerance."""
    gaps, scale = [], 0.0
    for x in batches:
        with torch.no_grad():
            expected, got = _flatten(module(x)), run(x)
        if [tuple(t.shape) for t in got] != [tuple(t.shape) for t in expected]:
            raise ValueError(
                f"{format} check: output shapes {[tuple(t.shape) for t in got]} "
                f"!= PyTorch's {[tuple(t.shape) for t in expected]}"
            )
        gaps.append(_max_abs_diff(expected, got))
        scale = max([scale, *(float(t.abs().max()) for t in expected if t.numel())])
    gap = _nan_max(gaps)
    tolerance = RELATIVE_TOLERANCE * max(1.0, scale)
    if not gap <= tolerance:  # NaN fails too
        raise ValueError(f"{format} check: max |exported - PyTorch| = {gap:.3e} exceeds {tolerance:.1e}")
    return gap, tolerance


def _require(*modules: str) -> None:
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: pip install 'refvision[export]'")


def _flatten(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for item in value for t in _flatten(item)]


def _max_abs_diff(a: list[Tensor], b: list[Tensor]) -> float:
    """Largest |a - b| over all pairs; NaN when any difference is NaN."""
    return _nan_max([float((x.float() - y.float()).abs().max()) for x, y in zip(a, b) if x.numel()])


def _nan_max(values: list[float]) -> float:
    """``max(values, default=0.0)``, but NaN when any value is NaN (Python's ``max`` may drop it)."""
    return math.nan if any(math.isnan(v) for v in values) else max(values, default=0.0)
