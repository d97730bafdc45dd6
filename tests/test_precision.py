"""bf16 mixed precision on CPU with RefConv and DRConv layers (autocast-safe transforms)."""

import math
from pathlib import Path

import pytest

from refvision.app.cli import lightning_cli
from refvision.app.demo.data import write_imagefolder


@pytest.mark.slow
@pytest.mark.parametrize(
    "conv",
    [
        ["-c", "configs/conv/refconv.yaml", "--allow_random_basis", "true"],
        ["-c", "configs/conv/drconv.yaml", "--model.conv.include", "[features.1.*,features.2.*]"],
    ],
    ids=["refconv", "drconv"],
)
def test_bf16_mixed_fit(tmp_path: Path, conv: list[str]) -> None:
    data = write_imagefolder(tmp_path / "images", train_per_class=4, val_per_class=2, size=32)
    cli = lightning_cli(
        [
            "fit",
            "-c",
            "configs/demo/classification.yaml",
            *conv,
            "--data.root",
            str(data),
            "--data.image_size",
            "32",
            "--data.resize_size",
            "32",
            "--data.batch_size",
            "8",
            "--model.backbone",
            "mobilenet_v2",
            "--model.image_size",
            "32",
            "--trainer.precision",
            "bf16-mixed",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss"]))
    assert 0.0 <= float(metrics["val/top1"]) <= 1.0
    assert Path(cli.trainer.checkpoint_callback.best_model_path).with_name("best-deploy.ckpt").is_file()
