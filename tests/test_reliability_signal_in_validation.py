"""SIGTERM while a fit validates: the exact epoch-end ``last.ckpt`` is kept and the resume is bit-exact."""

import os
import signal
from pathlib import Path

import pytest
import torch
from fit_process import REPO, STEPS_PER_EPOCH, checkpoint_dir, finish, output_of, start_fit

from refvision.app.demo.data import write_imagefolder

TOLERANCE = 1e-6


@pytest.mark.slow
def test_sigterm_during_validation_keeps_the_epoch_end_checkpoint(tmp_path: Path) -> None:
    data = write_imagefolder(tmp_path / "images", train_per_class=8, val_per_class=2, size=32)
    extra = ["--trainer.max_epochs", "3", "--data.num_workers", "2"]
    reference = start_fit(tmp_path / "reference", data, *extra)
    signalled = start_fit(
        tmp_path / "run",
        data,
        *extra,
        "--trainer.callbacks+",
        "signal_in_validation.SignalDuringValidation",
        "--trainer.callbacks.epoch",
        "1",
        env={"PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"},
    )
    assert signalled.wait(timeout=600) == 128 + signal.SIGTERM, output_of(signalled)
    last = checkpoint_dir(tmp_path / "run") / "last.ckpt"
    stopped = torch.load(last, map_location="cpu", weights_only=True)
    # The end of epoch 1 (its validation finished), not a batch of epoch 2.
    assert (stopped["epoch"], stopped["global_step"]) == (1, 2 * STEPS_PER_EPOCH)

    finish(start_fit(tmp_path / "run", data, *extra, "--ckpt_path", str(last)))
    finish(reference)
    ref = torch.load(checkpoint_dir(tmp_path / "reference") / "last.ckpt", map_location="cpu", weights_only=True)
    res = torch.load(checkpoint_dir(tmp_path / "run", 1) / "last.ckpt", map_location="cpu", weights_only=True)
    assert res["global_step"] == ref["global_step"] == 3 * STEPS_PER_EPOCH
    diff = max(float((ref["state_dict"][k].double() - v.double()).abs().max()) for k, v in res["state_dict"].items())
    assert diff <= TOLERANCE
