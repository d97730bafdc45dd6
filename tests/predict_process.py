"""Helpers shared by the tests that run ``refvision predict``: a checkpoint of a task as ``refvision fit``
writes it, and the ``predict`` command on a folder of images with the demo's and the predict configs."""

from pathlib import Path

import lightning as L
import torch

from refvision.app.cli import main
from refvision.tasks.base import RefvisionTask


def task_checkpoint(task: RefvisionTask, path: Path) -> Path:
    """A Lightning checkpoint of ``task`` as ``refvision fit`` writes it (LightningCLI records the class path)."""
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(task)
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["_class_path"] = f"{type(task).__module__}.{type(task).__qualname__}"
    torch.save(checkpoint, path)
    return path


def predict_folder(task: str, images: Path, ckpt: Path, out: Path, run: Path, *extra: str) -> None:
    """``refvision predict`` of ``task`` (``configs/demo/<task>.yaml`` + ``configs/predict/<task>.yaml``) on
    ``images`` with ``ckpt``, writing into ``out``, logging under ``run``; ``extra`` arguments go last."""
    main(
        [
            "predict",
            "-c",
            f"configs/demo/{task}.yaml",
            "-c",
            f"configs/predict/{task}.yaml",
            "--data.root",
            str(images),
            "--ckpt_path",
            str(ckpt),
            "--trainer.callbacks.output_dir",
            str(out),
            "--trainer.default_root_dir",
            str(run),
            "--trainer.enable_progress_bar",
            "false",
            *extra,
        ]
    )
