"""Export a task checkpoint's network to ONNX, TorchScript or a ``torch.export`` program.

What is exported is the deploy form of the task's graph (:mod:`refvision.export.graphs`): the
network without loss, and without post-processing unless asked (detection: backbone + head
outputs, or with ``postprocess`` final boxes; segmentation: logits at the input size, no sliding
window or test-time augmentation). A train-form checkpoint (RefConv or DRConv training layers
inside) is re-parameterized first, so the exported graph is the original architecture (RefConv)
or DRConv's inference form. Every file carries its description (:mod:`refvision.export.metadata`).
"""

import dataclasses
import importlib.util
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.fx.experimental._config
from torch import Tensor, nn

from refvision.checkpoints.deploy import load_task_to_write
from refvision.export.graphs import BATCH, HEIGHT, IMAGE_AXES, INPUT_NAME, ExportGraph, export_graph
from refvision.export.metadata import EXTRA_FILE, export_metadata, onnx_properties
from refvision.export.nms import onnx_translations
from refvision.surgery.convert import converted_layers, reparameterize
from refvision.utils.atomic_file import written_atomically

ExportFormat = Literal["onnx", "torchscript", "exported-program"]
FORMATS: tuple[str, ...] = ("onnx", "torchscript", "exported-program")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}
"""The conventional file suffix of each format (``torch.export.load`` warns about others)."""

RELATIVE_TOLERANCE = 1e-4
"""``check`` fails when an output's max |exported - PyTorch| > ``RELATIVE_TOLERANCE * max(1, max |PyTorch's|)``."""

EXPORT_BATCH = 2
"""Batch size of the export input: torch.export specializes dimensions of size 1, so a dynamic
batch needs an example with another size; the check then also runs one image."""


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What :func:`export_checkpoint` wrote and how it compares to PyTorch.

    ``exporter`` names the call that produced the file (for ONNX, ``dynamo=True`` or the
    fallback ``dynamo=False`` with ``fallback_reason``). ``dynamic_axes`` names the input's dims
    that may vary (``{0: "batch", 2: "height", 3: "width"}`` at most); ``fixed_size_reason`` says
    why height and width stayed fixed where they were asked dynamic. ``fold_max_abs_diff`` is the
    output gap between the train form and the exported deploy form (``None`` when the checkpoint
    already was in deploy form); ``max_abs_diff`` the gap between the exported file and the
    PyTorch deploy form over the ``checked_shapes`` inputs, against ``tolerance`` (the output
    whose gap is nearest its tolerance; both ``None`` without check). ``metadata`` is what the
    file says about itself (:func:`~refvision.export.metadata.export_metadata`).
    """

    source: str
    output: str
    format: str
    exporter: str
    reparameterized: bool
    input_shapes: tuple[tuple[int, ...], ...]
    dynamic_axes: dict[int, str]
    output_names: tuple[str, ...]
    metadata: dict[str, Any]
    fold_max_abs_diff: float | None = None
    max_abs_diff: float | None = None
    tolerance: float | None = None
    checked_shapes: tuple[tuple[int, ...], ...] = ()
    fallback_reason: str | None = None
    fixed_size_reason: str | None = None

    def __str__(self) -> str:
        lines = []
        if self.reparameterized:
            lines.append(
                f"{self.source} is a train-form checkpoint: re-parameterized before export "
                f"(max |train - deploy| = {self.fold_max_abs_diff:.3e})"
            )
        if self.fallback_reason:
            lines.append(f"dynamo ONNX export failed ({self.fallback_reason}); used the TorchScript-based exporter")
        if self.fixed_size_reason:
            lines.append(f"height and width fixed: a dynamic size did not export ({self.fixed_size_reason})")
        dims = ", ".join(self.dynamic_axes.values()) or "none"
        lines.append(
            f"exported with {self.exporter} on input {_shapes(self.input_shapes)}; dynamic dims: {dims}; "
            f"outputs: {', '.join(self.output_names)}"
        )
        if self.max_abs_diff is not None:
            lines.append(
                f"check: max |{self.format} - PyTorch| = {self.max_abs_diff:.3e} (tolerance {self.tolerance:.1e}) "
                f"on {_shapes(self.checked_shapes)}"
            )
        lines.append(f"wrote {self.output} (metadata: {', '.join(self.metadata)})")
        return "\n".join(lines)


def export_checkpoint(
    ckpt: str | os.PathLike,
    output: str | os.PathLike,
    format: ExportFormat,
    opset: int = 18,
    overwrite: bool = False,
    check: bool = True,
    postprocess: bool = False,
) -> ExportReport:
    """Export the deploy form of checkpoint ``ckpt``'s network to ``output``.

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
            ``(EXPORT_BATCH, 3, H, W)`` and, where the dims are dynamic, on one image of another
            size (or of the same size, when only the batch is dynamic), and compare with PyTorch.
        postprocess: detection only, ONNX only: end the graph in box decoding and NMS, so that it
            gives final detections (see :class:`~refvision.export.ssd.BatchSSDDetections`).

    What is exported, per task, and which dims are dynamic: :mod:`refvision.export.graphs`. The
    input is ONNX input ``images``, the outputs are named as the graph names them (``output`` for a
    single raw output); the file carries :func:`~refvision.export.metadata.export_metadata`.

    Raises:
        FileExistsError: ``output`` exists and not ``overwrite``.
        IsADirectoryError: ``output`` is a directory.
        ValueError: unknown ``format``; ``output`` is ``ckpt``; ``postprocess`` with another format or
            task; a non-finite fold gap; the post-processing not exporting; or a check gap above the
            tolerance or NaN.
    """
    if format not in FORMATS:
        raise ValueError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    if postprocess and format != "onnx":
        raise ValueError(
            f"--postprocess true with --format {format}: the post-processing exports to ONNX only "
            "(NMS as ONNX NonMaxSuppression); expected --format onnx or --postprocess false"
        )
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
    graph = export_graph(task.eval(), postprocess, EXPORT_BATCH)
    module = graph.module.eval()
    with torch.no_grad():
        n_outputs = len(_flatten(module(graph.inputs)))
    output_names = graph.output_names or (
        ("output",) if n_outputs == 1 else tuple(f"output_{i}" for i in range(n_outputs))
    )

    def describe(dynamic_axes: dict[str, dict[int, str]], file_opset: int | None) -> dict[str, Any]:
        return export_metadata(task, graph, source, reparameterized, dynamic_axes, file_opset)

    with written_atomically(output, suffix=SUFFIXES[format]) as tmp:
        exported = _EXPORTERS[format](graph, tmp, opset, output_names, describe)
        gap = tolerance = None
        checked = [graph.inputs]
        if HEIGHT in exported.input_axes.values() and graph.other_size is not None:
            checked.append(torch.rand(1, 3, *graph.other_size))
        elif BATCH in exported.input_axes.values():
            checked.append(graph.inputs[:1])
        if check:
            gap, tolerance = _check(module, exported.run, checked, format, output_names, graph.compare)
    return ExportReport(
        source=str(source),
        output=str(output),
        format=format,
        exporter=exported.exporter,
        reparameterized=reparameterized,
        input_shapes=_shapes_of(graph.inputs),
        dynamic_axes=exported.input_axes,
        output_names=output_names,
        metadata=exported.metadata,
        fold_max_abs_diff=fold_gap,
        max_abs_diff=gap,
        tolerance=tolerance,
        checked_shapes=tuple(s for x in checked for s in _shapes_of(x)) if check else (),
        fallback_reason=exported.fallback_reason,
        fixed_size_reason=exported.fixed_size_reason,
    )


FIXED_BY_EXPORTER = "the exporter fixed them: the model's code depends on the size it saw"

Runner = Callable[[Any], list[Tensor]]
"""Loads the written file lazily and runs it on a model input, giving the flattened outputs."""
Describe = Callable[[dict[str, dict[int, str]], int | None], dict[str, Any]]
"""The file's metadata, given the dynamic dims of its inputs and outputs and its ONNX opset."""


@dataclasses.dataclass(frozen=True)
class _Exported:
    exporter: str
    input_axes: dict[int, str]
    metadata: dict[str, Any]
    run: Runner
    fallback_reason: str | None = None
    fixed_size_reason: str | None = None


def _export_onnx(
    graph: ExportGraph, path: Path, opset: int, output_names: tuple[str, ...], describe: Describe
) -> _Exported:
    _require("onnx", "onnxscript")
    import onnx

    batched = isinstance(graph.inputs, Tensor)
    names = {"input_names": [INPUT_NAME] if batched else None, "output_names": list(output_names)}
    reasons = []
    for axes in _axes_to_try(graph):
        try:
            torch.onnx.export(
                graph.module,
                (graph.inputs,),
                path,
                dynamo=True,
                opset_version=opset,
                external_data=False,
                verbose=False,
                dynamic_shapes=({dim: torch.export.Dim(name) for dim, name in axes.items()},) if axes else None,
                custom_translation_table=onnx_translations(),
                **names,
            )
            exporter = "torch.onnx.export(dynamo=True)"
            break
        except Exception as err:  # noqa: BLE001  (any dynamo failure falls back; the reason is reported)
            reasons.append(_first_line(err))
    else:
        if graph.facts.get("postprocess"):
            raise ValueError(
                f"ONNX export of the detection post-processing failed ({reasons[-1]}); "
                "--postprocess false exports the raw outputs"
            )
        # The TorchScript-based exporter is not told height and width: it would record the sizes it
        # traced wherever Python computes with them, and the graph would be wrong at other sizes.
        dynamic_axes = {name: {0: BATCH} for name in [INPUT_NAME, *output_names]} if graph.dynamic_batch else None
        torch.onnx.export(
            graph.module, (graph.inputs,), path, dynamo=False, opset_version=opset, dynamic_axes=dynamic_axes, **names
        )
        exporter = "torch.onnx.export(dynamo=False)"
    model = onnx.load(str(path))
    axes_of = {INPUT_NAME: IMAGE_AXES, **graph.output_axes}
    dynamic: dict[str, dict[int, str]] = {}
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        for index, dim in enumerate(dims):
            # The exporter names an output's dims after the expression that computes them; they follow the input's.
            if dim.HasField("dim_param") and index in axes_of.get(value.name, {}):
                dim.dim_param = axes_of[value.name][index]
        dynamic[value.name] = {i: d.dim_param for i, d in enumerate(dims) if d.HasField("dim_param")}
    file_opset = next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))
    metadata = describe({name: axes for name, axes in dynamic.items() if axes}, file_opset)
    del model.metadata_props[:]
    for key, value in onnx_properties(metadata).items():
        model.metadata_props.add(key=key, value=value)
    model.doc_string = f"refvision {metadata['task']} model exported from {metadata['source_checkpoint']}"
    onnx.save(model, str(path))

    def run(x: Any) -> list[Tensor]:
        _require("onnxruntime")
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), _flatten(x))}
        return [torch.from_numpy(out) for out in session.run(None, feeds)]

    input_axes = dynamic[model.graph.input[0].name]
    return _Exported(
        exporter=exporter,
        input_axes=input_axes,
        metadata=metadata,
        run=run,
        fallback_reason=reasons[-1] if exporter.endswith("(dynamo=False)") else None,
        fixed_size_reason=(reasons or [FIXED_BY_EXPORTER])[0]
        if graph.dynamic_size and HEIGHT not in input_axes.values()
        else None,
    )


def _export_torchscript(
    graph: ExportGraph, path: Path, opset: int, output_names: tuple[str, ...], describe: Describe
) -> _Exported:
    traced = torch.jit.trace(graph.module, (graph.inputs,), check_trace=False)
    # A trace records the shapes it saw: every dim is fixed, and it is checked at the export batch only.
    metadata = describe({}, None)
    torch.jit.save(traced, str(path), _extra_files={EXTRA_FILE: json.dumps(metadata)})

    def run(x: Any) -> list[Tensor]:
        return _flatten(torch.jit.load(str(path), map_location="cpu")(x))

    return _Exported(exporter="torch.jit.trace", input_axes={}, metadata=metadata, run=run)


def _export_program(
    graph: ExportGraph, path: Path, opset: int, output_names: tuple[str, ...], describe: Describe
) -> _Exported:
    tries, reasons = _axes_to_try(graph), []
    for axes in tries:
        try:
            # As torch.onnx.export(dynamo=True) does: a dim that is 1 somewhere inside (the last feature
            # map of a small example) is not taken for a size that makes the code branch.
            with torch.fx.experimental._config.patch(backed_size_oblivious=True):
                program = torch.export.export(
                    graph.module,
                    (graph.inputs,),
                    dynamic_shapes=({dim: torch.export.Dim(name) for dim, name in axes.items()},) if axes else None,
                )
            break
        except Exception as err:  # noqa: BLE001  (a dynamic size that fails is retried fixed; the reason is reported)
            if axes is tries[-1]:
                raise
            reasons.append(_first_line(err))
    names = set(axes.values())
    dynamic = {INPUT_NAME: axes} if axes else {}
    for name in output_names:
        follows = {dim: label for dim, label in graph.output_axes.get(name, {}).items() if label in names}
        if follows:
            dynamic[name] = follows
    metadata = describe(dynamic, None)
    torch.export.save(program, path, extra_files={EXTRA_FILE: json.dumps(metadata)})

    def run(x: Any) -> list[Tensor]:
        return _flatten(torch.export.load(path).module()(x))

    return _Exported(
        exporter="torch.export.export",
        input_axes=axes,
        metadata=metadata,
        run=run,
        fixed_size_reason=reasons[0] if reasons else None,
    )


_EXPORTERS: dict[str, Callable[..., _Exported]] = {
    "onnx": _export_onnx,
    "torchscript": _export_torchscript,
    "exported-program": _export_program,
}


def _axes_to_try(graph: ExportGraph) -> list[dict[int, str]]:
    """The input dims to ask dynamic, in order: with height and width where the graph allows them, then without."""
    if not graph.dynamic_batch:
        return [{}]
    return [IMAGE_AXES, {0: BATCH}] if graph.dynamic_size else [{0: BATCH}]


def _check(
    module: nn.Module,
    run: Runner,
    batches: list[Any],
    format: str,
    names: tuple[str, ...],
    compare: Callable[[list[Tensor], list[Tensor]], list[float]] | None,
) -> tuple[float, float]:
    """The gap between ``run`` and ``module`` over ``batches`` of the output nearest its tolerance, and that
    tolerance; raises when an output's gap is above its tolerance (or NaN) or a shape differs.

    Each output's gap is ``compare``'s (default: its largest element difference), its tolerance
    ``RELATIVE_TOLERANCE * max(1, max |PyTorch's output|)`` over the batches.
    """
    gaps: list[list[float]] = []
    scales = [0.0] * len(names)
    for x in batches:
        with torch.no_grad():
            expected = _flatten(module(x))
            try:
                got = run(x)
            except Exception as err:  # noqa: BLE001  (the runtime's own errors, e.g. a size the graph cannot take)
                raise ValueError(
                    f"{format} check: the written file fails on {_shapes(_shapes_of(x))}: {_first_line(err)}"
                ) from None
        if [tuple(t.shape) for t in got] != [tuple(t.shape) for t in expected]:
            raise ValueError(
                f"{format} check: output shapes {[tuple(t.shape) for t in got]} "
                f"!= PyTorch's {[tuple(t.shape) for t in expected]}"
            )
        gaps.append(compare(expected, got) if compare else [_max_abs_diff([e], [g]) for e, g in zip(expected, got)])
        scales = [max(old, float(t.abs().max()) if t.numel() else 0.0) for old, t in zip(scales, expected)]
    per_output = [_nan_max(list(column)) for column in zip(*gaps)]
    tolerances = [RELATIVE_TOLERANCE * max(1.0, scale) for scale in scales]
    worst = max(
        range(len(names)), key=lambda i: math.inf if math.isnan(per_output[i]) else per_output[i] / tolerances[i]
    )
    gap, tolerance = per_output[worst], tolerances[worst]
    if not gap <= tolerance:  # NaN fails too
        raise ValueError(
            f"{format} check: max |exported - PyTorch| = {gap:.3e} exceeds {tolerance:.1e} (output {names[worst]})"
        )
    return gap, tolerance


def _require(*modules: str) -> None:
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: pip install 'refvision[export]'")


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"


def _shapes_of(value: Any) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(t.shape) for t in _flatten(value))


def _shapes(shapes: tuple[tuple[int, ...], ...]) -> str:
    return ", ".join("x".join(map(str, s)) for s in shapes)


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
