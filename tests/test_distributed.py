"""Lightning DDP on CPU (gloo, 2 processes): metrics reduce to the single-process values."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from refvision.data.demo import write_imagefolder

REFVISION = [sys.executable, "-m", "refvision.cli"]


def _run(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*REFVISION, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _logged(root: Path, key: str) -> float:
    (metrics,) = root.glob("lightning_logs/version_*/metrics.csv")
    values = [float(row[key]) for row in csv.DictReader(metrics.open()) if row.get(key)]
    assert len(values) == 1, values
    return values[0]


@pytest.mark.slow
def test_ddp_fit_and_test_match_single_process(tmp_path: Path) -> None:
    # 4 classes x 4 val images, batch 4: each of the 2 ranks sees 2 whole batches, no padding.
    data = write_imagefolder(tmp_path / "images", train_per_class=4, val_per_class=4, size=32)
    repo = Path(__file__).resolve().parents[1]
    common = [
        "-c", str(repo / "configs/demo/classification.yaml"), "-c", str(repo / "configs/conv/refconv.yaml"),
        "--data.root", str(data), "--data.image_size", "32", "--data.resize_size", "32", "--data.batch_size", "4",
        "--model.backbone", "mobilenet_v2", "--model.image_size", "32", "--trainer.enable_progress_bar", "false",
        "--trainer.accelerator", "cpu",
    ]
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    baseline = tmp_path / "baseline"
    _run(["fit", *common[:2], *common[4:], *ddp, "--trainer.max_epochs", "1",
          "--trainer.limit_train_batches", "2", "--trainer.default_root_dir", str(baseline)], tmp_path)
    best = next(baseline.glob("lightning_logs/version_0/checkpoints/best.ckpt"))
    refocus = tmp_path / "refocus"
    # Frozen RefConv bases must not trip DDP's unused-parameter check.
    _run(["fit", *common, *ddp, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
          "--model.init_from", str(best), "--trainer.default_root_dir", str(refocus)], tmp_path)
    ckpts = sorted(p.name for p in refocus.rglob("*.ckpt"))
    assert ckpts == ["best-deploy.ckpt", "best.ckpt", "last.ckpt"]  # rank 0 wrote each once
    deploy = next(refocus.rglob("best-deploy.ckpt"))
    _run(["test", *common, *ddp, "--ckpt_path", str(deploy), "--trainer.default_root_dir", str(tmp_path / "t2")], tmp_path)
    _run(["test", *common, "--trainer.devices", "1", "--ckpt_path", str(deploy),
          "--trainer.default_root_dir", str(tmp_path / "t1")], tmp_path)
    assert _logged(tmp_path / "t2", "test/top1") == _logged(tmp_path / "t1", "test/top1")
    assert torch.load(deploy, weights_only=True)["hyper_parameters"]["conv"] == {"kind": "none"}
