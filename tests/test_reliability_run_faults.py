"""Faults of a run, each with the real thing: options as typed, NaN weights, a RefConv without trained
weights, a full filesystem (a real tmpfs), a read-only one, a missing GPU, a finished run resumed, a failed
run's folder, and one error rule for every command."""

import math
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from refvision.app.cli import main
from refvision.app.demo.data import write_imagefolder
from refvision.app.lightning_cli import lightning_cli
from refvision.lifecycle.run_folder import remove_if_nothing_of_value

CONFIG = "configs/demo/classification.yaml"
REFCONV = "configs/conv/refconv.yaml"
LIMITS = (
    "limit_train_batches",
    "limit_val_batches",
    "limit_test_batches",
    "limit_predict_batches",
    "overfit_batches",
    "val_check_interval",
)


def _args(data: Path, root: Path, *extra: str, logger: bool = False) -> list[str]:
    return [
        "-c",
        CONFIG,
        "--data.root",
        str(data),
        "--data.image_size",
        "32",
        "--data.resize_size",
        "32",
        "--data.batch_size",
        "2",
        "--model.backbone",
        "mobilenet_v2",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "1",
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(root),
        *([] if logger else ["--trainer.logger", "false"]),
        *extra,
    ]


def _one_line(capsys: pytest.CaptureFixture, argv: list[str], status: int | None = None) -> str:
    """The single ``refvision <cmd>: error: ...`` line that ``refvision ARGV`` ends with."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    code = exit_info.value.code
    lines = (capsys.readouterr().err if isinstance(code, int) else str(code)).strip().splitlines()
    lines = [line for line in lines if line.startswith("refvision ")] if isinstance(code, int) else lines
    assert len(lines) == 1 and lines[0].startswith(f"refvision {argv[0]}: error: "), lines
    if status is not None:  # SystemExit("message") exits with status 1 after printing it
        assert (code if isinstance(code, int) else 1) == status
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("data") / "images", train_per_class=2, val_per_class=2, size=32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    """The run folder of a finished 3-epoch fit (``checkpoints/last.ckpt``, ``best.ckpt``)."""
    root = tmp_path_factory.mktemp("trained")
    lightning_cli(["fit", *_args(data, root, "--trainer.max_epochs", "3", "--trainer.limit_val_batches", "1")])
    return root


@pytest.mark.parametrize("option", LIMITS)
def test_limit_options_keep_int_and_float_meanings(tmp_path: Path, data: Path, option: str) -> None:
    for given, expected in (("2", 2), ("0.5", 0.5), ("1", 1), ("1.0", 1.0)):
        cli = lightning_cli([*_args(data, tmp_path), f"--trainer.{option}", given], run=False)
        value = cli.config.trainer[option]
        assert value == expected and type(value) is type(expected), (option, given, value)


@pytest.mark.slow
def test_limit_val_batches_runs_that_many_batches(tmp_path: Path, data: Path) -> None:
    batches = math.ceil(len(list((data / "val").rglob("*.*"))) / 2)
    assert batches >= 4
    for given, expected in (("1", 1), ("0.5", batches // 2), ("1.0", batches)):
        cli = lightning_cli(["validate", *_args(data, tmp_path), "--trainer.limit_val_batches", given])
        assert cli.trainer.num_val_batches == [expected], given


def _with_nan(trained: Path, path: Path) -> tuple[Path, str]:
    checkpoint = torch.load(trained / "checkpoints/best.ckpt", weights_only=True)
    key = next(k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and "classifier" in k)
    checkpoint["state_dict"][key].view(-1)[0] = float("nan")
    torch.save(checkpoint, path)
    return path, key


def test_test_and_predict_refuse_nan_weights_naming_the_tensor(
    tmp_path: Path, data: Path, trained: Path, capsys: pytest.CaptureFixture
) -> None:
    ckpt, key = _with_nan(trained, tmp_path / "nan.ckpt")
    line = _one_line(capsys, ["test", *_args(data, tmp_path), "--ckpt_path", str(ckpt)], status=2)
    assert f"--ckpt_path {ckpt} holds non-finite weights (NaN or inf) in model.{key.removeprefix('model.')}" in line
    out = tmp_path / "predictions"
    predict = ["predict", *_args(data / "val", tmp_path), "-c", "configs/predict/classification.yaml"]
    line = _one_line(capsys, [*predict, "--trainer.callbacks.output_dir", str(out), "--ckpt_path", str(ckpt)], 2)
    assert key in line and not out.exists()


def test_refconv_on_random_weights_needs_to_be_asked_for(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture
) -> None:
    line = _one_line(capsys, ["fit", *_args(data, tmp_path, "-c", REFCONV)], status=2)
    assert "model.conv.kind=refconv" in line and "--allow_random_basis true" in line
    assert not (tmp_path / "checkpoints").exists()
    lightning_cli(["fit", *_args(data, tmp_path, "-c", REFCONV, "--allow_random_basis", "true")])
    assert (tmp_path / "checkpoints/last.ckpt").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_missing_gpu_is_one_line_and_leaves_no_run_folder(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture
) -> None:
    line = _one_line(capsys, ["fit", *_args(data, tmp_path, "--trainer.accelerator", "gpu", logger=True)], status=1)
    assert "gpu" in line.lower()
    assert not (tmp_path / "lightning_logs").exists()


def test_resuming_a_finished_run_with_fewer_epochs_is_one_line_and_leaves_no_run_folder(
    tmp_path: Path, data: Path, trained: Path, capsys: pytest.CaptureFixture
) -> None:
    last = trained / "checkpoints/last.ckpt"
    argv = ["fit", *_args(data, tmp_path, "--ckpt_path", str(last), logger=True)]
    line = _one_line(capsys, argv, status=2)
    assert f"--ckpt_path {last} was saved in epoch 3 of its run, beyond --trainer.max_epochs 1" in line
    assert not (tmp_path / "lightning_logs").exists()


def test_a_folder_with_results_is_kept(tmp_path: Path) -> None:
    run = tmp_path / "version_0"
    run.mkdir()
    (run / "hparams.yaml").write_text("a: 1\n")
    (run / "metrics.csv").write_text("epoch,step,train/loss\n")
    (run / "notes.md").write_text("mine")
    assert not remove_if_nothing_of_value(run)
    (run / "notes.md").unlink()
    (run / "metrics.csv").write_text("epoch,step,train/loss\n0,0,1.5\n")
    assert not remove_if_nothing_of_value(run)
    (run / "metrics.csv").write_text("epoch,step,train/loss\n")
    assert remove_if_nothing_of_value(run) and not run.exists()


def test_data_errors_are_one_line_and_the_traceback_is_behind_debug(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    bad = write_imagefolder(tmp_path / "bad", train_per_class=1, val_per_class=1, size=32)
    broken = next((bad / "val").rglob("*.jpg"))
    broken.write_bytes(b"")
    argv = ["validate", *_args(bad, tmp_path)]
    line = _one_line(capsys, argv, status=1)
    assert broken.name in line
    with pytest.raises(ValueError, match=broken.name):
        main([*argv, "--debug"])
    monkeypatch.setenv("REFVISION_DEBUG", "1")
    with pytest.raises(ValueError, match=broken.name):
        main(argv)


def _mount_tmpfs(folder: Path, options: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root in a container that allows it): {done.stderr!r}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB filesystem (tmpfs): room for a run's config and logs, not for its checkpoint."""
    folder = tmp_path / "small"
    _mount_tmpfs(folder, "size=1m")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture
def read_only_disk(tmp_path: Path) -> Iterator[Path]:
    """A real read-only filesystem (tmpfs mounted ``ro``): not writable even by root."""
    folder = tmp_path / "read_only"
    _mount_tmpfs(folder, "ro,size=1m")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.slow
def test_disk_full_during_fit_and_on_resume_is_one_line(
    tmp_path: Path, data: Path, trained: Path, small_disk: Path, capsys: pytest.CaptureFixture
) -> None:
    line = _one_line(capsys, ["fit", *_args(data, small_disk)], status=1)
    assert f"no space left on the device of {small_disk / 'checkpoints'} (" in line and "MiB free" in line
    last = trained / "checkpoints/last.ckpt"
    resume = ["fit", *_args(data, small_disk / "resumed", "--trainer.max_epochs", "4", "--ckpt_path", str(last))]
    line = _one_line(capsys, resume, status=1)
    assert f"no space left on the device of {small_disk / 'resumed' / 'checkpoints'} (" in line
    assert "best.ckpt" in line


def test_predict_into_a_read_only_folder_is_refused_before_predicting(
    tmp_path: Path, data: Path, trained: Path, read_only_disk: Path, capsys: pytest.CaptureFixture
) -> None:
    out = read_only_disk / "predictions"
    predict = ["predict", *_args(data / "val", tmp_path), "-c", "configs/predict/classification.yaml"]
    argv = [*predict, "--trainer.callbacks.output_dir", str(out), "--ckpt_path", str(trained / "checkpoints/best.ckpt")]
    line = _one_line(capsys, argv, status=1)
    assert f"output_dir {out}: the folder {read_only_disk} is not writable" in line
