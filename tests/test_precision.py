"""Mixed precision (bf16; fp16 on CUDA) with RefConv and DRConv layers (autocast-safe transforms):
the training steps stay finite, and the deploy form written from them folds in float32."""

import math
from pathlib import Path

import pytest
import torch

from refvision.app.cli import lightning_cli
from refvision.app.demo.data import write_imagefolder
from refvision.checkpoints.deploy import load_task_checkpoint


@pytest.mark.slow
@pytest.mark.parametrize(
    "conv",
    [
        ["-c", "configs/conv/refconv.yaml", "--allow_random_basis", "true"],
        ["-c", "configs/conv/drconv.yaml", "--model.conv.include", "[features.1.*,features.2.*]"],
    ],
    ids=["refconv", "drconv"],
)
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_fit(tmp_path: Path, device: str, precision: str, conv: list[str]) -> None:
    if device == "cpu" and precision == "16-mixed":
        pytest.skip("fp16 AMP is CUDA's: Lightning runs 16-mixed as bf16-mixed on CPU")
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
            "--trainer.accelerator",
            "gpu" if device == "cuda" else "cpu",
            "--trainer.devices",
            "1",
            "--trainer.precision",
            precision,
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
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    train_form, _ = load_task_checkpoint(best)
    deploy_form, _ = load_task_checkpoint(best.with_name("best-deploy.ckpt"))
    assert deploy_form.deploy or deploy_form.conv_config["kind"] == "none"  # DRConv's inference form; RefConv folded
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = train_form.raw_forward(train_form.model.eval(), images)
        got = deploy_form.raw_forward(deploy_form.model.eval(), images)
    assert expected.dtype == got.dtype == torch.float32 and torch.isfinite(expected).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * max(1.0, float(expected.abs().max())))
