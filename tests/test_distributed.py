"""Lightning DDP on CPU (gloo, 2 processes) and on 2 CUDA devices (NCCL): metrics reduce to the
single-process values."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins import TorchSyncBatchNorm
from torch import nn

from refvision.app.demo.data import write_cityscapes, write_imagefolder, write_vocdevkit
from refvision.checkpoints.deploy import reparameterize_checkpoint
from refvision.nn.refconv import RefConv
from refvision.tasks.segmentation import SegmentationTask

REFVISION = [sys.executable, "-m", "refvision"]
REPO = Path(__file__).resolve().parents[1]
DDP = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]


def _run(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*REFVISION, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _logged(root: Path, key: str) -> float:
    (metrics,) = root.glob("lightning_logs/version_*/metrics.csv")
    values = [float(row[key]) for row in csv.DictReader(metrics.open()) if row.get(key)]
    assert len(values) == 1, values
    return values[0]


def _ddp_fit(tmp_path: Path, args: list[str], root: Path) -> Path:
    """``fit`` on 2 processes of a model with RefConv layers; returns its deploy checkpoint."""
    # Frozen RefConv bases must not trip DDP's unused-parameter check.
    _run(["fit", *args, *DDP, "--trainer.default_root_dir", str(root)], tmp_path)
    ckpts = sorted(p.name for p in root.rglob("*.ckpt"))
    assert ckpts == ["best-deploy.ckpt", "best.ckpt", "last.ckpt"]  # rank 0 wrote each once
    return next(root.rglob("best-deploy.ckpt"))


def _test_on_two_and_one(tmp_path: Path, common: list[str], deploy: Path, key: str) -> tuple[float, float]:
    """``test`` of ``deploy`` with 2 processes and with 1: the logged ``key`` of each."""
    _run(
        ["test", *common, *DDP, "--ckpt_path", str(deploy), "--trainer.default_root_dir", str(tmp_path / "t2")],
        tmp_path,
    )
    _run(
        [
            "test",
            *common,
            "--trainer.devices",
            "1",
            "--ckpt_path",
            str(deploy),
            "--trainer.default_root_dir",
            str(tmp_path / "t1"),
        ],
        tmp_path,
    )
    return _logged(tmp_path / "t2", key), _logged(tmp_path / "t1", key)


@pytest.mark.slow
def test_ddp_fit_and_test_match_single_process(tmp_path: Path, device: str) -> None:
    if device == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip(f"NCCL DDP needs 2 CUDA devices, found {torch.cuda.device_count()}")
    # 4 classes x 4 val images, batch 4: each of the 2 ranks sees 2 whole batches, no padding.
    data = write_imagefolder(tmp_path / "images", train_per_class=4, val_per_class=4, size=32)
    common = [
        "-c",
        str(REPO / "configs/demo/classification.yaml"),
        "-c",
        str(REPO / "configs/conv/refconv.yaml"),
        "--allow_random_basis",
        "true",
        "--data.root",
        str(data),
        "--data.image_size",
        "32",
        "--data.resize_size",
        "32",
        "--data.batch_size",
        "4",
        "--model.backbone",
        "mobilenet_v2",
        "--model.image_size",
        "32",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.accelerator",
        "gpu" if device == "cuda" else "cpu",
    ]
    baseline = tmp_path / "baseline"
    _run(
        [
            "fit",
            *common[:2],
            *common[4:],
            *DDP,
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.default_root_dir",
            str(baseline),
        ],
        tmp_path,
    )
    best = next(baseline.glob("lightning_logs/version_0/checkpoints/best.ckpt"))
    deploy = _ddp_fit(
        tmp_path,
        [*common, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--model.init_from", str(best)],
        tmp_path / "refocus",
    )
    two, one = _test_on_two_and_one(tmp_path, common, deploy, "test/top1")
    assert two == one
    assert torch.load(deploy, weights_only=True)["hyper_parameters"]["conv"] == {"kind": "none"}


def _fit_refconv_then_test(tmp_path: Path, task: str, data: Path, options: list[str], key: str, epochs: int) -> None:
    """DDP ``fit`` with RefConv of the demo config of ``task`` on ``data`` (plus ``options``), on CPU,
    then ``test`` of its deploy checkpoint with 2 processes and with 1."""
    common = [
        "-c",
        str(REPO / f"configs/demo/{task}.yaml"),
        "--data.root",
        str(data),
        "--data.pin_memory",
        "false",
        *options,
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
    ]
    deploy = _ddp_fit(
        tmp_path,
        [
            *common,
            "-c",
            str(REPO / "configs/conv/refconv.yaml"),
            "--allow_random_basis",
            "true",
            "--trainer.max_epochs",
            str(epochs),
            "--trainer.limit_train_batches",
            "2",
            "--trainer.num_sanity_val_steps",
            "0",
        ],
        tmp_path / "fit",
    )
    two, single = _test_on_two_and_one(tmp_path, common, deploy, key)
    # Same images, same per-rank batch size as the single process: the reduced metric is the same
    # up to float summation order; a rank's share missing or counted twice moves it by far more.
    assert 0.0 < single <= 1.0
    assert two == pytest.approx(single, abs=1e-6)


@pytest.mark.slow
def test_ddp_detection_map_matches_single_process(tmp_path: Path) -> None:
    # 8 images, batch 2: each rank evaluates two whole batches; mAP needs every rank's detections.
    # Evaluated on the 8 training images: a few epochs from scratch fit them well enough for a
    # non-zero mAP (on unseen images every mAP is still 0), which the equality below needs.
    data = write_vocdevkit(tmp_path / "VOCdevkit", num_train=8, num_test=4, size=(48, 64))
    _fit_refconv_then_test(
        tmp_path,
        "detection",
        data,
        [
            "--data.batch_size",
            "2",
            "--data.image_size",
            "64",
            "--data.val_sets",
            "[2007-train]",
            "--data.test_sets",
            "[2007-train]",
        ],
        "test/map",
        epochs=8,
    )


@pytest.mark.slow
def test_ddp_segmentation_miou_matches_single_process(tmp_path: Path) -> None:
    # `--trainer.sync_batchnorm true` is GPU-only (torch's DDP refuses SyncBatchNorm on CPU); its
    # effect on refvision's models is covered by test_sync_batchnorm_keeps_the_checkpoint_format.
    data = write_cityscapes(tmp_path / "cityscapes", num_train=4, num_val=4, size=(64, 128))
    _fit_refconv_then_test(
        tmp_path,
        "segmentation",
        data,
        [
            "--data.batch_size",
            "2",
            "--data.val_batch_size",
            "2",
            "--data.crop_size",
            "[64,128]",
            "--model.example_size",
            "[64,128]",
        ],
        "test/miou",
        epochs=4,
    )


def test_sync_batchnorm_keeps_the_checkpoint_format(tmp_path: Path) -> None:
    # What `--trainer.sync_batchnorm true` does to the LightningModule before DDP wraps it.
    task = SegmentationTask(num_classes=5, conv={"kind": "refconv"}, trainable="refocus_only", example_size=(64, 64))
    plain_keys = list(task.state_dict())
    TorchSyncBatchNorm().apply(task)
    synced = [m for m in task.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert synced and not any(type(m) is nn.BatchNorm2d for m in task.modules())
    task.train()  # refocus_only keeps every norm layer's statistics, SyncBatchNorm included
    assert not any(m.training for m in synced)
    assert list(task.state_dict()) == plain_keys
    torch.manual_seed(0)
    with torch.no_grad():  # a trained transform, not the zero-initialized one
        for module in task.modules():
            if isinstance(module, RefConv):
                module.refocus_weight.normal_(std=0.01)
    path = tmp_path / "synced.ckpt"
    torch.save(
        {
            "state_dict": task.state_dict(),
            "hyper_parameters": dict(task.hparams),
            "refvision": {"task": "refvision.tasks.segmentation.SegmentationTask"},
        },
        path,
    )
    # The deploy path reads the checkpoint into plain BatchNorm layers and folds it exactly.
    report = reparameterize_checkpoint(path, tmp_path / "deploy.ckpt")
    assert report.max_abs_diff < 1e-4
    task.eval()
    deployed = torch.load(tmp_path / "deploy.ckpt", weights_only=True)["state_dict"]
    plain = SegmentationTask(num_classes=5, example_size=(64, 64)).eval()
    plain.load_state_dict(deployed, strict=True)
    inputs = task.example_inputs()
    with torch.no_grad():
        assert torch.allclose(plain.model(inputs), task.model(inputs), atol=1e-4)
