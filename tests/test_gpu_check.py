"""The speed options a GPU user expects (``model.channels_last``, ``model.compile``) and the GPU check
(``make gpu-check``), both walked on CPU: the options against the eager contiguous network, the check
by its ``--dry-run``."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from refvision.app.cli import lightning_cli
from refvision.nn import DRConv, RefConv
from refvision.tasks.classification import ClassificationTask

REPO = Path(__file__).resolve().parents[1]


class TinyClassification(ClassificationTask):
    """ClassificationTask on a 4-layer network (a stem conv for RefConv, a 1x1 conv for DRConv)."""

    def build_model(self) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, self.num_classes),
        )


def _task(**options: bool) -> TinyClassification:
    """The tiny task with a RefConv stem and a DRConv 1x1 conv, the same weights on every call, set
    up as a Trainer sets it up."""
    torch.manual_seed(0)
    task = TinyClassification(num_classes=3, image_size=16, conv={"kind": "refconv", "select": "kxk"}, **options)
    with torch.no_grad():  # a trained refocusing transform, not the initial one
        task.model[0].refocus_weight.normal_(std=0.1)
    task.model = _with_drconv(task.model)
    task.setup("fit")
    return task


def _with_drconv(model: nn.Sequential) -> nn.Sequential:
    torch.manual_seed(1)
    model[3] = DRConv.from_conv(model[3], regions=4)
    with torch.no_grad():  # regions that differ
        model[3].generator.expand_weight.normal_(std=0.5)
    return model


def _step(task: TinyClassification, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Logits of a training forward and the gradients of its loss."""
    task.train()
    task.zero_grad(set_to_none=True)
    images, labels = task.on_after_batch_transfer((images, labels), 0)
    logits = task(images)
    F.cross_entropy(logits, labels).backward()
    return logits.detach(), {name: p.grad for name, p in task.named_parameters() if p.grad is not None}


def test_speed_options_are_off_by_default_and_keep_checkpoint_keys() -> None:
    task = TinyClassification(num_classes=3)
    assert (task.channels_last, task.compile_network) == (False, False)
    assert TinyClassification(num_classes=3, channels_last=True, compile=True).hparams["compile"] is True
    plain, sped_up = _task(), _task(channels_last=True, compile=True)
    assert list(sped_up.state_dict()) == list(plain.state_dict())


def test_channels_last_gives_the_contiguous_outputs_and_gradients() -> None:
    plain, channels_last = _task(), _task(channels_last=True)
    assert channels_last.model[0].weight.is_contiguous(memory_format=torch.channels_last)  # RefConv's basis
    assert not channels_last.model[0].weight.is_contiguous()
    seen = []
    channels_last.model[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    images, labels = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    logits, grads = _step(plain, images, labels)
    cl_logits, cl_grads = _step(channels_last, images, labels)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    torch.testing.assert_close(cl_logits, logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == cl_grads.keys() and {"model.0.refocus_weight", "model.3.guide_weight"} <= grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(cl_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    assert isinstance(channels_last.model[0], RefConv)


@pytest.mark.slow
def test_compiled_network_gives_the_eager_outputs_and_gradients() -> None:
    plain, compiled = _task(), _task(compile=True)
    compiling = []
    compiled.model[3].register_forward_pre_hook(lambda *_: compiling.append(torch.compiler.is_compiling()))
    images, labels = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    logits, grads = _step(plain, images, labels)
    compiled_logits, compiled_grads = _step(compiled, images, labels)
    assert compiling and all(compiling), "the network did not run compiled"
    torch.testing.assert_close(compiled_logits, logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == compiled_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    plain.eval(), compiled.eval()
    with torch.no_grad():  # eager eval on CPU takes DRConv's grouped layout, the compiled one the tiled
        torch.testing.assert_close(compiled(images), plain(images), rtol=1e-5, atol=1e-5)


def _cli_args(root: Path, data: Path) -> list[str]:
    """The command on the tiny network (this module's :class:`TinyClassification`) and image folder."""
    return [
        "--model",
        f"{__name__}.TinyClassification",
        "--model.image_size",
        "24",
        "--data",
        "refvision.data.imagefolder.ImageFolderDataModule",
        "--data.root",
        str(data),
        "--data.image_size",
        "24",
        "--data.resize_size",
        "24",
        "--data.batch_size",
        "4",
        "--data.num_workers",
        "0",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "1",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
    ]


def _results(cli: Any, command: str) -> list[Tensor]:
    """What ``command`` computed: its logged metrics, or (predict) its predictions."""
    if command == "predict":
        return [value for batch in cli.trainer.predict_loop.predictions for value in batch.values()]
    return list(cli.trainer.callback_metrics.values())


@pytest.mark.slow
def test_evaluating_commands_take_the_speed_options_over_the_checkpoint(
    tmp_path: Path, image_folder_template: Path
) -> None:
    """``validate`` / ``test`` / ``predict --ckpt_path`` accept ``model.compile`` and
    ``model.channels_last`` (run options) that differ from the checkpoint's, run with the config's
    values, and compute the eager contiguous network's results."""
    fit = lightning_cli(["fit", *_cli_args(tmp_path / "fit", image_folder_template)])
    assert (fit.model.compile_network, fit.model.channels_last) == (False, False)
    ckpt = fit.trainer.checkpoint_callback.best_model_path
    for command in ("validate", "test", "predict"):
        args = [command, *_cli_args(tmp_path / command, image_folder_template), "--ckpt_path", ckpt]
        eager = lightning_cli(args)
        sped_up = lightning_cli([*args, "--model.compile", "true", "--model.channels_last", "true"])
        network = sped_up.model.model
        assert sped_up.model.compile_network and network._compiled_call_impl is not None, command
        assert network[0].weight.is_contiguous(memory_format=torch.channels_last), command
        expected, got = _results(eager, command), _results(sped_up, command)
        assert expected and len(got) == len(expected), command
        for value, expected_value in zip(got, expected):
            torch.testing.assert_close(value, expected_value, rtol=1e-5, atol=1e-5, msg=command)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: make gpu-check would run the check")
@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_gpu_check_without_cuda_stops_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        ["make", "--no-print-directory", "gpu-check", f"PY={sys.executable}", f"OUT={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode != 0
    said = [line for line in (done.stdout + done.stderr).splitlines() if not re.match(r"make(\[\d+\])?: \*\*\*", line)]
    assert len(said) == 1 and said[0].startswith("gpu-check: error: no CUDA device is present"), said
    assert not out.exists()


def _params_total(profile: str, model: str, method: str) -> tuple[int, int]:
    """``params total`` of the train and deploy forms in ``profile.log``'s table of ``model, method``."""
    table = profile.split(f"### {model}, {method}\n", 1)[1].split("```", 2)[1]
    train, deploy = re.search(r"params total\s+([\d,]+)\s+([\d,]+)", table).groups()
    return int(train.replace(",", "")), int(deploy.replace(",", ""))


@pytest.mark.slow
@pytest.mark.gpu_dry_run
def test_dry_run_walks_every_step_on_cpu(tmp_path: Path) -> None:
    """``benchmarks/gpu_check.py --dry-run``: every step on CPU at tiny sizes, every row with numbers."""
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    output = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, output
    assert {p.name for p in tmp_path.iterdir()} == {
        "gpu-check.md",
        "tests.log",
        "drconv_vs_dense.log",
        "throughput.md",
        "throughput.json",
        "throughput.log",
        "profile.log",
    }, output
    assert re.search(r"^\d+ skipped, \d+ deselected", (tmp_path / "tests.log").read_text(), re.M), "CUDA tests"
    assert "3x3 8->8 @12x12" in (tmp_path / "drconv_vs_dense.log").read_text()
    profiles = (tmp_path / "profile.log").read_text()
    assert len(re.findall(r"latency ms \(median, cpu\)\s+[\d.]+\s+[\d.]+", profiles)) == 8, profiles
    for model in ("SSDLite320-MobileNetV3", "SSD300-VGG16", "DeepLabV3+ MobileNetV2", "DeepLabV3+ ResNet-50"):
        plain = _params_total(profiles, model, "RefConv")[1]  # RefConv's deploy form: the plain network
        assert min(_params_total(profiles, model, "DRConv")) > plain, f"{model}: DRConv converted no conv"
    rows = json.loads((tmp_path / "throughput.json").read_text())
    assert len(rows) == 4 * 3 * 2 * 2  # models x forms x precisions x channels_last
    assert [r for r in rows if r["note"]] == []
    assert all(r["excluded"] > 0 and r["included"] > 0 for r in rows)
    assert all(r["converted"] > 0 for r in rows if r["form"] != "baseline")
    report = (tmp_path / "gpu-check.md").read_text()
    assert "| SSD300-VGG16 | baseline | 2 | bf16 | on |" in report and "MMDetection SSD300 VOC: 0.159" in report
    assert "(deploy form, batch 1, whole 64x128 image)" in report
