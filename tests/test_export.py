"""`refvision export`: train and deploy checkpoints to ONNX, TorchScript and ExportedProgram.

Checkpoints are built without training: random refocusing / region-filter weights and batch-norm
statistics of a random batch, so that outputs are of order one. Every exported file is compared
with the *train-form* PyTorch model (RefConv / DRConv layers inside) on a fresh input, within
``TOLERANCE * max(1, max |output|)``. Exported graphs take [0, 1] RGB: the reference normalises
with torchvision's ``normalize`` and the checkpoint's mean / std, then runs the bare network.
"""

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
from refvision.nn import DRConv, RefConv
from refvision.tasks.base import RefvisionTask
from refvision.tasks.classification import ClassificationTask

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
        conv={"kind": "refconv", "include": ["features.[0-3].*"]},
    )
    return _write_checkpoint(task, tmp_path_factory.mktemp("refconv") / "train.ckpt")


@pytest.fixture(scope="module")
def drconv_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    task = ClassificationTask(
        backbone="mobilenet_v2",
        num_classes=3,
        image_size=SIZE,
        conv={"kind": "drconv", "select": "pointwise", "include": ["features.1.*"]},
    )
    return _write_checkpoint(task, tmp_path_factory.mktemp("drconv") / "train.ckpt")


def test_onnx_of_a_refconv_train_checkpoint_is_the_vanilla_network(
    tmp_path: Path, refconv_ckpt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model.onnx"
    main(["export", "--ckpt", refconv_ckpt, "--output", str(out), "--format", "onnx"])
    printed = capsys.readouterr().out
    assert "train-form checkpoint: re-parameterized" in printed
    assert "torch.onnx.export(dynamo=True)" in printed and "batch dim dynamic" in printed
    images = torch.rand(3, 3, SIZE, SIZE)  # neither the export batch (2) nor the checked one (1)
    _assert_close(_onnxruntime(out, images), _train_outputs(refconv_ckpt, images))
    convs = [n for n in onnx.load(str(out)).graph.node if n.op_type == "Conv"]
    vanilla = [m for m in torchvision.models.mobilenet_v2().modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == len(vanilla)


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
    if format == "torchscript":
        images = torch.rand(refvision.export.formats.EXPORT_BATCH, 3, SIZE, SIZE)
        exported = torch.jit.load(str(out))
    else:
        images = torch.rand(3, 3, SIZE, SIZE)
        exported = torch.export.load(out).module()
    with torch.no_grad():
        got = exported(images)
    _assert_close(got, _train_outputs(refconv_ckpt, images))


def test_drconv_train_checkpoint_exports_its_inference_form(tmp_path: Path, drconv_ckpt: str) -> None:
    out = tmp_path / "drconv.onnx"
    report = export_checkpoint(drconv_ckpt, out, "onnx")
    assert report.reparameterized and report.exporter == "torch.onnx.export(dynamo=True)" and report.dynamic_batch
    assert report.max_abs_diff is not None and report.tolerance is not None
    assert report.max_abs_diff <= report.tolerance
    assert {n.domain for n in onnx.load(str(out)).graph.node} <= {"", "ai.onnx"}, "standard ONNX ops only"
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
    assert report.exporter == "torch.onnx.export(dynamo=False)" and report.dynamic_batch
    assert report.fallback_reason == "RuntimeError: unsupported operator"
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
    with pytest.raises(ValueError, match="torchscript check: max .* exceeds"):
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


@pytest.mark.slow
def test_segmentation_export(tmp_path: Path) -> None:
    from refvision.tasks.segmentation import SegmentationTask

    task = SegmentationTask(
        encoder="mobilenet_v2",
        num_classes=3,
        example_size=(64, 64),
        mean=(0.2, 0.5, 0.7),
        std=(0.1, 0.3, 0.2),
        conv={"kind": "refconv", "include": ["encoder.features.[0-3].*"]},
    )
    ckpt = _write_checkpoint(task, tmp_path / "segmentation.ckpt")
    out = tmp_path / "segmentation.onnx"
    report = export_checkpoint(ckpt, out, "onnx")
    assert report.reparameterized and report.dynamic_batch and report.input_shapes == ((2, 3, 64, 64),)
    images = torch.rand(3, 3, 64, 64)
    expected = _train_outputs(ckpt, images)
    assert expected.shape == (3, 3, 64, 64)
    _assert_close(_onnxruntime(out, images), expected)


@pytest.mark.slow
def test_detection_export_stops_before_post_processing(tmp_path: Path) -> None:
    from refvision.tasks.detection import DetectionTask

    task = DetectionTask(
        detector="ssdlite320_mobilenet_v2",
        num_classes=3,
        image_size=64,
        conv={"kind": "refconv", "include": ["backbone.features.0.[0-3].*"]},
    )
    ckpt = _write_checkpoint(task, tmp_path / "detection.ckpt")
    out = tmp_path / "detection.pt2"
    report = export_checkpoint(ckpt, out, "exported-program")
    assert report.reparameterized and not report.dynamic_batch and report.input_shapes == ((3, 64, 64),)
    images = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        got = torch.export.load(out).module()(images)
    expected = _train_outputs(ckpt, images)
    assert expected.ndim == 2 and expected.shape[0] == 1  # (B, anchors x (4 + classes)): raw, no NMS
    _assert_close(got, expected)
