"""The description every export carries: the task, its classes and input, the graph's dims, and its origin.

ONNX files hold it as ``metadata_props`` (onnxruntime: ``session.get_modelmeta().custom_metadata_map``):
one entry per key, strings as they are and every other value as JSON. TorchScript and
ExportedProgram files hold the same mapping as JSON in the extra file :data:`EXTRA_FILE`.
"""

import importlib.metadata
import json
from pathlib import Path
from typing import Any

from refvision.export.graphs import ExportGraph
from refvision.tasks.base import RefvisionTask

EXTRA_FILE = "refvision.json"
"""Name of the metadata entry of TorchScript (``torch.jit.load(..., _extra_files=...)``) and
ExportedProgram (``torch.export.load(..., extra_files=...)``) files."""


def export_metadata(
    task: RefvisionTask,
    graph: ExportGraph,
    source: str,
    reparameterized: bool,
    dynamic_axes: dict[str, dict[int, str]],
    opset: int | None,
) -> dict[str, Any]:
    """What an export of ``task``'s ``graph`` says about itself.

    Keys: ``task`` (``classification``, ``detection``, ``segmentation``), ``task_class``, the task's
    :attr:`ExportGraph.facts` (``num_classes``, ``class_names`` (null: classes named by number),
    ``mean`` / ``std`` the graph normalises its [0, 1] input with (null: none), ``input_size``
    ``[H, W]`` it was built for, and per task more), ``input`` and ``outputs`` (layouts),
    ``dynamic_axes`` (``{name: {dim: dim name}}`` of the dims that may vary), ``opset`` (ONNX, else
    null), ``conv_method`` (the checkpoint's ``conv.kind``), ``form`` (always ``deploy``: RefConv /
    ACConv folded into plain convs, DRConv in its inference form), ``reparameterized`` (a train-form
    checkpoint was folded on export), ``source_checkpoint`` (its file name) and ``refvision_version``.
    """
    return {
        "task": type(task).__name__.removesuffix("Task").lower(),
        "task_class": f"{type(task).__module__}.{type(task).__qualname__}",
        **graph.facts,
        "outputs": graph.outputs,
        "dynamic_axes": {name: {str(dim): label for dim, label in axes.items()} for name, axes in dynamic_axes.items()},
        "opset": opset,
        "conv_method": task.conv_config["kind"],
        "form": "deploy",
        "reparameterized": reparameterized,
        "source_checkpoint": Path(source).name,
        "refvision_version": refvision_version(),
    }


def onnx_properties(metadata: dict[str, Any]) -> dict[str, str]:
    """``metadata`` as ONNX ``metadata_props``: strings as they are, other values as JSON."""
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}


def refvision_version() -> str | None:
    """The installed refvision's version; None when it runs from a source tree that is not installed."""
    try:
        return importlib.metadata.version("refvision")
    except importlib.metadata.PackageNotFoundError:
        return None
