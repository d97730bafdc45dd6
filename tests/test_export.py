"""`refvision export`: train and deploy checkpoints to ONNX, TorchScript and ExportedProgram.

Checkpoints are built without training: random refocusing / region-filter weights and batch-norm
statistics of a random batch, so that outputs are of order one. Every exported file is compared
with the *train-form* PyTorch model (RefConv / DRConv layers inside) on a fresh input, within
``TOLERANCE * max(1, max |output|)``. Exported graphs take [0, 1] RGB: the reference normalises
with torchvision's ``normalize`` and the checkpoint's mean / std, then runs the bare network.
"""

import contextlib
import importlib.metadata
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import pytest
import torch
import torchvision
from torch import nn
from torchvision.transforms.v2.functional import normalize

import refvision.export.formats
from refvision.app.cli import main
from refvision.checkpoints.deploy import load_task_checkpoint, reparameterize_checkpoint
from refvision.data.description import IMAGENET_MEAN, IMAGENET_STD
from refvision.export.formats import export_checkpoint
from refvision.export.graphs import export_graph
from refvision.nn import DRConv, RefConv
from refvision.tasks.base import RefvisionTask
from refvision.tasks.classification import ClassificationTask
from refvision.tasks.detection import DetectionTask
from refvision.tasks.segmentation import SegmentationTask

TOLERANCE = 1e-4
SIZE = 32

# TorchScript and the TorchScript-based ONNX exporter are deprecated upstream; they are tested on purpose.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning"),
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Tiny inputs gain nothing from threads, and on a busy machine OpenMP threads wait on each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_checkpoint(task: RefvisionTask, path: Path) -> str:
    """A train-form checkpoint as Lightning writes it, with weights that make the test meaningful."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in task.named_parameters():
            if "refocus_weight" in name or ".generator." in name:
                param.normal_(0, 0.05)
        for module in task.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = None  # one forward pass sets the statistics of that batch
        task.train()
        task.profile_module()(_batch(task, 8))
    class_path = f"{type(task).__module__}.{type(task).__qualname__}"
    torch.save(
        {
            "state_dict": task.state_dict(),
            "hyper_parameters": {**dict(task.hparams), "_class_path": class_path},
            "refvision": {"task": class_path, "form": "train"},
        },
        path,
    )
    return str(path)


def _batch(task: RefvisionTask, n: int) -> Any:
    """``n`` examples: one batch tensor, or one list of images (detection)."""
    examples = [task.example_inputs() for _ in range(n)]
    return torch.cat(examples) if isinstance(examples[0], torch.Tensor) else [x for e in examples for x in e]


def _train_outputs(ckpt: str, inputs: Any) -> torch.Tensor:
    """The train-form network on ``inputs`` in [0, 1]: normalised, then the bare network (detection:
    the SSD, whose transform normalises)."""
    task, _ = load_task_checkpoint(ckpt)
    assert any(isinstance(m, (RefConv, DRConv)) for m in task.modules()), "the reference is the train form"
    with torch.no_grad():
        if isinstance(inputs, torch.Tensor):
            return task.model(
                normalize(
                    inputs, list(task.hparams.get("mean", IMAGENET_MEAN)), list(task.hparams.get("std", IMAGENET_STD))
                )
            )
        return task.profile_module()(inputs)


def _assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, rtol=0, atol=TOLERANCE * max(1.0, float(expected.abs().max())))
    assert float(expected.abs().max()) > 0.1, "outputs this small would make the comparison vacuous"


def _onnxruntime(path: Path, inputs: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
    return torch.from_numpy(out)


@pytest.fixture(scope="module")
def refconv_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    # The first blocks only: the default G gives depthwise convs a dense C x C transform (40 M
    # training-only parameters on the whole network), which only slows the test down.
    task = ClassificationTask(
        backbone="mobilenet_v2",
        num_classes=3,
        image_size=SIZE,
        class_names=["cat", "dog", "fox"],
        mean=(0.5, 0.4, 0.3),
        std=(0.2, 0.25, 0.3),
        conv={"kind": "refconv", "include": ["features.[0-3].*"]},
    )
    return _write_checkpoint(task, tmp_path_factory.mktemp("refconv") / "train.ckpt")


@pytest.fixture(scope="module")
def refconv_onnx(tmp_path_factory: pytest.TempPathFactory, refconv_ckpt: str) -> tuple[Path, str]:
    """``refconv_ckpt`` exported by the command to ONNX, and what the command printed."""
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["export", "--ckpt", refconv_ckpt, "--output", str(out), "--format", "onnx"])
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def drconv_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    task = ClassificationTask(
        backbone="mobilenet_v2",
        num_classes=3,
        image_size=SIZE,
        conv={"kind": "drconv", "select": "pointwise", "include": ["features.1.*"]},
    )
    return _write_checkpoint(task, tmp_path_factory.mktemp("drconv") / "train.ckpt")


def test_onnx_of_a_refconv_train_checkpoint_is_the_vanilla_network(refconv_onnx: tuple[Path, str]) -> None:
    out, printed = refconv_onnx
    assert "train-form checkpoint: re-parameterized" in printed
    assert "torch.onnx.export(dynamo=True)" in printed
    convs = [n for n in onnx.load(str(out)).graph.node if n.op_type == "Conv"]
    vanilla = [m for m in torchvision.models.mobilenet_v2().modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == len(vanilla)


def test_onnx_classifier_takes_any_batch_height_and_width(refconv_onnx: tuple[Path, str], refconv_ckpt: str) -> None:
    out, printed = refconv_onnx
    assert "dynamic dims: batch, height, width" in printed
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    # Neither the export input (2 x 32 x 32) nor the check's second one (1 x 49 x 35).
    for shape in [(3, 3, SIZE, SIZE), (1, 3, 48, 40), (2, 3, 37, 61)]:
        images = torch.rand(shape)
        _assert_close(_onnxruntime(out, images), _train_outputs(refconv_ckpt, images))


def test_onnx_metadata_is_the_checkpoint_s(refconv_onnx: tuple[Path, str], refconv_ckpt: str) -> None:
    out, _ = refconv_onnx
    model = onnx.load(str(out))
    props = {entry.key: entry.value for entry in model.metadata_props}
    hparams = torch.load(refconv_ckpt, weights_only=True)["hyper_parameters"]
    assert props["task"] == "classification"
    assert props["task_class"] == hparams["_class_path"]
    assert json.loads(props["class_names"]) == hparams["class_names"] == ["cat", "dog", "fox"]
    assert json.loads(props["num_classes"]) == hparams["num_classes"]
    assert json.loads(props["mean"]) == list(hparams["mean"]) and json.loads(props["std"]) == list(hparams["std"])
    assert json.loads(props["input_size"]) == [hparams["image_size"], hparams["image_size"]]
    assert json.loads(props["dynamic_axes"]) == {
        "images": {"0": "batch", "2": "height", "3": "width"},
        "output": {"0": "batch"},
    }
    assert json.loads(props["opset"]) == 18 == next(o.version for o in model.opset_import if o.domain == "")
    assert props["refvision_version"] == importlib.metadata.version("refvision")
    assert props["conv_method"] == hparams["conv"]["kind"] == "refconv"
    assert props["form"] == "deploy" and json.loads(props["reparameterized"]) is True
    assert props["source_checkpoint"] == Path(refconv_ckpt).name == "train.ckpt"
    assert set(json.loads(props["outputs"])) == {"output"}
    # What onnxruntime users read.
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map == props


@pytest.mark.parametrize(("format", "form"), [("torchscript", "deploy"), ("exported-program", "train")])
def test_torchscript_and_exported_program(
    tmp_path: Path, refconv_ckpt: str, format: str, form: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = refconv_ckpt
    if form == "deploy":
        ckpt = str(tmp_path / "deploy.ckpt")
        reparameterize_checkpoint(refconv_ckpt, ckpt)
    out = tmp_path / f"model{refvision.export.formats.SUFFIXES[format]}"
    main(["export", "--ckpt", ckpt, "--output", str(out), "--format", format])
    assert ("re-parameterized" in capsys.readouterr().out) == (form == "train")
    extra = {"refvision.json": ""}
    if format == "torchscript":
        shapes = [(refvision.export.formats.EXPORT_BATCH, 3, SIZE, SIZE)]  # a trace is fixed to what it saw
        exported = torch.jit.load(str(out), _extra_files=extra)
    else:
        shapes = [(3, 3, SIZE, SIZE), (1, 3, 45, 29)]
        exported = torch.export.load(out, extra_files=extra).module()
    for shape in shapes:
        images = torch.rand(shape)
        with torch.no_grad():
            got = exported(images)
        _assert_close(got, _train_outputs(refconv_ckpt, images))
    metadata = json.loads(extra["refvision.json"])
    assert metadata["class_names"] == ["cat", "dog", "fox"] and metadata["mean"] == [0.5, 0.4, 0.3]
    assert metadata["reparameterized"] == (form == "train") and metadata["source_checkpoint"] == Path(ckpt).name
    assert metadata["opset"] is None
    axes = (
        {}
        if format == "torchscript"
        else {"images": {"0": "batch", "2": "height", "3": "width"}, "output": {"0": "batch"}}
    )
    assert metadata["dynamic_axes"] == axes


def test_drconv_train_checkpoint_exports_its_inference_form(tmp_path: Path, drconv_ckpt: str) -> None:
    out = tmp_path / "drconv.onnx"
    report = export_checkpoint(drconv_ckpt, out, "onnx")
    assert report.reparameterized and report.exporter == "torch.onnx.export(dynamo=True)"
    # DRConv's region layout is cut by the size of its feature map: the export fixes height and width, and says so.
    assert report.dynamic_axes == {0: "batch"} and report.fixed_size_reason
    assert "height and width fixed" in str(report)
    assert report.max_abs_diff is not None and report.tolerance is not None
    assert report.max_abs_diff <= report.tolerance
    model = onnx.load(str(out))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}, "standard ONNX ops only"
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, SIZE, SIZE]
    props = {entry.key: entry.value for entry in model.metadata_props}
    assert json.loads(props["dynamic_axes"]) == {"images": {"0": "batch"}, "output": {"0": "batch"}}
    assert props["conv_method"] == "drconv" and props["form"] == "deploy"
    images = torch.rand(3, 3, SIZE, SIZE)
    _assert_close(_onnxruntime(out, images), _train_outputs(drconv_ckpt, images))


def test_onnx_falls_back_to_the_torchscript_exporter(
    tmp_path: Path, refconv_ckpt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_export = torch.onnx.export

    def dynamo_fails(*args: Any, dynamo: bool = True, **kwargs: Any) -> Any:
        if dynamo:
            raise RuntimeError("unsupported operator\nsecond line")
        return real_export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    out = tmp_path / "legacy.onnx"
    report = export_checkpoint(refconv_ckpt, out, "onnx")
    assert report.exporter == "torch.onnx.export(dynamo=False)"
    assert report.fallback_reason == "RuntimeError: unsupported operator"
    # The TorchScript-based exporter keeps height and width fixed; the file says so.
    assert report.dynamic_axes == {0: "batch"} and report.fixed_size_reason == "RuntimeError: unsupported operator"
    props = {entry.key: entry.value for entry in onnx.load(str(out)).metadata_props}
    assert json.loads(props["dynamic_axes"]) == {"images": {"0": "batch"}, "output": {"0": "batch"}}
    images = torch.rand(3, 3, SIZE, SIZE)
    _assert_close(_onnxruntime(out, images), _train_outputs(refconv_ckpt, images))


def test_existing_output_unknown_format_and_failed_check(
    tmp_path: Path, refconv_ckpt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "model.pt"
    out.write_bytes(b"keep")
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main(["export", "--ckpt", refconv_ckpt, "--output", str(out), "--format", "torchscript"])
    assert out.read_bytes() == b"keep"
    with pytest.raises(SystemExit):
        main(["export", "--ckpt", refconv_ckpt, "--output", str(out), "--format", "tflite"])
    with pytest.raises(ValueError, match="expected one of onnx, torchscript, exported-program"):
        export_checkpoint(refconv_ckpt, tmp_path / "x", "tflite")  # type: ignore[arg-type]

    # A check that fails leaves neither the output nor a temporary file behind.
    monkeypatch.setattr(refvision.export.formats, "RELATIVE_TOLERANCE", -1.0)
    with pytest.raises(ValueError, match=r"torchscript check: max .* exceeds .* \(output output\)"):
        export_checkpoint(refconv_ckpt, out, "torchscript", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"] and out.read_bytes() == b"keep"
    main(
        [
            "export",
            "--ckpt",
            refconv_ckpt,
            "--output",
            str(out),
            "--format",
            "torchscript",
            "--overwrite",
            "--check",
            "false",
        ]
    )
    assert isinstance(torch.jit.load(str(out)), torch.jit.ScriptModule)


def test_help_documents_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["export", "--help"])
    assert raised.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--ckpt", "--output", "--format", "--opset", "--postprocess", "--overwrite", "--check"):
        assert option in text
    assert "metadata_props" in text and "height and width" in text
    assert "boxes (batch, max_det, 4)" in text and "num_detections (batch,)" in text and "Default false" in text


def test_postprocess_is_for_detection_in_onnx(tmp_path: Path, refconv_ckpt: str) -> None:
    out = tmp_path / "model.onnx"
    with pytest.raises(SystemExit, match=r"^refvision export: error: --postprocess true with --format torchscript: .*"):
        main(
            ["export", "--ckpt", refconv_ckpt, "--output", str(out), "--format", "torchscript", "--postprocess", "true"]
        )
    with pytest.raises(SystemExit) as raised:
        main(["export", "--ckpt", refconv_ckpt, "--output", str(out), "--format", "onnx", "--postprocess", "true"])
    message = str(raised.value)
    assert message.startswith("refvision export: error: --postprocess true: only detection checkpoints")
    assert "ClassificationTask" in message and "\n" not in message
    assert not out.exists()


@pytest.mark.slow
def test_segmentation_export_takes_any_size_in_whole_mode(tmp_path: Path) -> None:
    task = SegmentationTask(
        encoder="mobilenet_v2",
        num_classes=3,
        example_size=(64, 64),
        class_names=["road", "car", "sky"],
        palette=[[128, 64, 128], [0, 0, 142], [70, 130, 180]],
        mean=(0.2, 0.5, 0.7),
        std=(0.1, 0.3, 0.2),
        conv={"kind": "refconv", "include": ["encoder.features.[0-3].*"]},
    )
    ckpt = _write_checkpoint(task, tmp_path / "segmentation.ckpt")
    out = tmp_path / "segmentation.onnx"
    report = export_checkpoint(ckpt, out, "onnx")
    assert report.reparameterized and report.input_shapes == ((2, 3, 64, 64),)
    assert report.dynamic_axes == {0: "batch", 2: "height", 3: "width"}
    reference, _ = load_task_checkpoint(ckpt)  # the train form, in whole-image mode
    # Sizes that are not multiples of the network's stride of 16: padded inside and cropped back.
    for shape in [(3, 3, 64, 64), (1, 3, 50, 70), (2, 3, 97, 33)]:
        images = torch.rand(shape)
        with torch.no_grad():
            expected = reference(images)
        assert expected.shape == (shape[0], 3, *shape[2:])
        _assert_close(_onnxruntime(out, images), expected)
    model = onnx.load(str(out))
    dims = model.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    props = {entry.key: entry.value for entry in model.metadata_props}
    assert props["task"] == "segmentation" and props["inference"] == "whole"
    assert json.loads(props["class_names"]) == ["road", "car", "sky"]
    assert json.loads(props["palette"]) == [[128, 64, 128], [0, 0, 142], [70, 130, 180]]
    assert json.loads(props["mean"]) == [0.2, 0.5, 0.7] and json.loads(props["std"]) == [0.1, 0.3, 0.2]
    assert json.loads(props["input_size"]) == [64, 64]


def test_segmentation_in_slide_mode_exports_one_window() -> None:
    task = SegmentationTask(
        encoder="mobilenet_v2", num_classes=3, inference="slide", slide_crop=(48, 64), slide_stride=(32, 40)
    ).eval()
    graph = export_graph(task, postprocess=False, batch_size=2)
    assert graph.inputs.shape == (2, 3, 48, 64) and graph.dynamic_batch and not graph.dynamic_size
    assert graph.facts["slide_crop"] == [48, 64] and graph.facts["slide_stride"] == [32, 40]
    assert graph.facts["input_size"] == [48, 64]
    whole = SegmentationTask(encoder="mobilenet_v2", num_classes=3, example_size=(64, 96)).eval()
    graph = export_graph(whole, postprocess=False, batch_size=2)
    assert graph.inputs.shape == (2, 3, 64, 96) and graph.dynamic_size and "slide_crop" not in graph.facts


@pytest.mark.slow
def test_detection_export_stops_before_post_processing(tmp_path: Path) -> None:
    task = DetectionTask(
        detector="ssdlite320_mobilenet_v2",
        num_classes=3,
        image_size=64,
        conv={"kind": "refconv", "include": ["backbone.features.0.[0-3].*"]},
    )
    ckpt = _write_checkpoint(task, tmp_path / "detection.ckpt")
    out = tmp_path / "detection.pt2"
    report = export_checkpoint(ckpt, out, "exported-program")
    assert report.reparameterized and report.input_shapes == ((2, 3, 64, 64),)
    assert report.dynamic_axes == {0: "batch", 2: "height", 3: "width"}  # resized to 64 x 64 inside
    exported = torch.export.load(out).module()
    for shape in [(1, 3, 64, 64), (3, 3, 90, 41)]:
        images = torch.rand(shape)
        with torch.no_grad():
            got = exported(images)
        expected = _train_outputs(ckpt, list(images))
        assert expected.shape[0] == shape[0] and expected.ndim == 2  # (B, anchors x (4 + classes)): raw, no NMS
        _assert_close(got, expected)
