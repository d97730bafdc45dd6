"""Checkpoints and resume, tested with real faults: `kill -9`, SIGTERM / SIGINT, kills while saving."""

import logging
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from fit_process import (
    STEPS_PER_EPOCH,
    checkpoint_dir,
    file_hashes,
    finish,
    fit_in_process,
    output_of,
    start_fit,
    wait_for,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from refvision.app.demo.data import write_imagefolder
from refvision.lifecycle.run_checkpoint import RunCheckpoint
from refvision.utils.atomic_file import is_temporary

TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("data") / "images", train_per_class=8, val_per_class=2, size=32)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _run_state(checkpoint: dict) -> dict:
    return next(v for k, v in checkpoint["callbacks"].items() if k.startswith("RunCheckpoint"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()), default=0.0)


def _scalars(log_dir: Path) -> dict[tuple[str, int], float]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if is_temporary(p)]


@pytest.mark.slow
def test_kill9_then_resume_equals_uninterrupted_run(tmp_path: Path, data: Path) -> None:
    # RefConv so the fit also writes best-deploy.ckpt; two workers so worker seeds matter.
    extra = [
        "-c",
        "configs/conv/refconv.yaml",
        "--allow_random_basis",
        "true",
        "--data.num_workers",
        "2",
        "--trainer.max_epochs",
        "3",
    ]
    reference = start_fit(tmp_path / "reference", data, *extra)
    killed = start_fit(tmp_path / "run", data, *extra)
    last = checkpoint_dir(tmp_path / "run") / "last.ckpt"
    wait_for(lambda: last.exists() or killed.poll() is not None, 600, "the first last.ckpt")
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, output_of(killed)
    killed_at = _load(last)["global_step"]
    assert 0 < killed_at < 3 * STEPS_PER_EPOCH
    first_folder = file_hashes(checkpoint_dir(tmp_path / "run"))

    finish(start_fit(tmp_path / "run", data, *extra, "--ckpt_path", str(last)))
    finish(reference)

    ref_dir, res_dir = checkpoint_dir(tmp_path / "reference"), checkpoint_dir(tmp_path / "run", version=1)
    ref, res = _load(ref_dir / "last.ckpt"), _load(res_dir / "last.ckpt")
    assert (res["epoch"], res["global_step"]) == (ref["epoch"], ref["global_step"]) == (2, 3 * STEPS_PER_EPOCH)
    assert _max_diff(ref["state_dict"], res["state_dict"]) <= TOLERANCE
    ref_opt, res_opt = ref["optimizer_states"][0], res["optimizer_states"][0]
    assert [g["lr"] for g in ref_opt["param_groups"]] == [g["lr"] for g in res_opt["param_groups"]]
    for index, state in ref_opt["state"].items():
        assert _max_diff(state, res_opt["state"][index]) <= TOLERANCE
    assert ref["lr_schedulers"] == res["lr_schedulers"]

    # The best of the whole run, in the resumed run's own folder; the killed run's folder untouched.
    assert float(_run_state(res)["best_model_score"]) == float(_run_state(ref)["best_model_score"])
    for name in ("best.ckpt", "best-deploy.ckpt"):
        assert _max_diff(_load(ref_dir / name)["state_dict"], _load(res_dir / name)["state_dict"]) <= TOLERANCE
    assert file_hashes(checkpoint_dir(tmp_path / "run")) == first_folder

    # Every metric the resumed run logged is the uninterrupted run's, and none after the kill is missing.
    ref_scalars, res_scalars = _scalars(ref_dir.parent), _scalars(res_dir.parent)
    after_kill = {key for key in ref_scalars if key[1] > killed_at and key[0] != "epoch"}
    assert after_kill and after_kill <= res_scalars.keys()
    for key, value in res_scalars.items():
        assert value == pytest.approx(ref_scalars[key], rel=1e-5, abs=TOLERANCE), key


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_resumable_checkpoint(tmp_path: Path, data: Path, signum: int) -> None:
    proc = start_fit(tmp_path, data, "--trainer.max_epochs", "1000")
    last = checkpoint_dir(tmp_path) / "last.ckpt"
    wait_for(lambda: last.exists() or proc.poll() is not None, 600, "the first last.ckpt")
    seen = _load(last)["global_step"]
    proc.send_signal(signum)
    assert proc.wait(timeout=300) == 128 + signum, output_of(proc)
    assert f"resume with --ckpt_path {last}" in output_of(proc)
    stopped = _load(last)
    assert stopped["global_step"] > seen
    if signum == signal.SIGTERM:
        # The same command resumes it, ends the epoch it was stopped in and runs one more (one more,
        # so that the resumed run has an epoch to finish even when the signal came at an epoch's end).
        finish(start_fit(tmp_path, data, "--trainer.max_epochs", str(stopped["epoch"] + 2), "--ckpt_path", str(last)))
        assert (
            _load(checkpoint_dir(tmp_path, 1) / "last.ckpt")["global_step"] == (stopped["epoch"] + 2) * STEPS_PER_EPOCH
        )


def _kill_while_saving(root: Path, data: Path, env: dict[str, str]) -> list[Path]:
    """Start a fit that validates (and so saves best and last) after every step, kill -9 it as soon as
    a temporary checkpoint file is there once last.ckpt exists; returns the temporaries left."""
    folder = checkpoint_dir(root)
    proc = start_fit(
        root,
        data,
        "--trainer.max_epochs",
        "1000",
        "--trainer.val_check_interval",
        "1",
        "--model.optim.lr",
        "0",
        env=env,
    )
    wait_for(
        lambda: ((folder / "last.ckpt").exists() and _temporaries(folder)) or proc.poll() is not None,
        600,
        "a checkpoint being written",
    )
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, output_of(proc)
    return _temporaries(folder)


@pytest.mark.slow
def test_kill_while_saving_with_tmpdir_elsewhere(tmp_path: Path, data: Path) -> None:
    shm = Path("/dev/shm") / f"refvision-{os.getpid()}-{tmp_path.name}"
    shm.mkdir()
    try:
        assert os.stat(shm).st_dev != os.stat(tmp_path).st_dev, "TMPDIR must be on another filesystem"
        env = {"TMPDIR": str(shm)}
        for attempt in range(3):  # the kill must land inside a save; a save is over in milliseconds
            root = tmp_path / f"run{attempt}"
            orphans = _kill_while_saving(root, data, env)
            if orphans:
                break
        assert orphans, "no kill landed inside a save in 3 attempts"
        folder = checkpoint_dir(root)
        for path in folder.glob("*.ckpt"):
            if not is_temporary(path):
                _load(path)  # every file at a final path is whole
        assert not list(shm.iterdir())

        last = folder / "last.ckpt"
        epoch = _load(last)["epoch"]
        out = finish(
            start_fit(
                root,
                data,
                "--trainer.max_epochs",
                str(epoch + 1),
                "--trainer.val_check_interval",
                "1",
                "--model.optim.lr",
                "0",
                "--ckpt_path",
                str(last),
                env=env,
            )
        )
        assert not _temporaries(root)
        assert all(f"removed {p}" in out for p in orphans)
    finally:
        shutil.rmtree(shm)


@pytest.mark.slow
def test_last_every_epoch_and_resume_into_new_folder(tmp_path: Path, data: Path) -> None:
    # lr 0 and frozen norm statistics: the monitored top-1 never improves after epoch 0.
    frozen = [
        "-c",
        "configs/conv/refconv.yaml",
        "--allow_random_basis",
        "true",
        "--model.trainable",
        "refocus_only",
        "--model.optim.lr",
        "0",
    ]
    first = fit_in_process(tmp_path / "first", data, *frozen, "--trainer.max_epochs", "3")
    callback = first.trainer.checkpoint_callback
    assert isinstance(callback, RunCheckpoint)
    assert _load(Path(callback.best_model_path))["epoch"] == 0
    assert _load(Path(callback.last_model_path))["epoch"] == 2
    old = file_hashes(tmp_path / "first")

    resumed = fit_in_process(
        tmp_path / "second", data, *frozen, "--trainer.max_epochs", "4", "--ckpt_path", callback.last_model_path
    )
    assert file_hashes(tmp_path / "first") == old
    moved = resumed.trainer.checkpoint_callback
    assert Path(moved.best_model_path).parent == checkpoint_dir(tmp_path / "second")
    assert float(moved.best_model_score) == float(callback.best_model_score)
    assert os.path.samefile(moved.best_model_path, callback.best_model_path)  # carried as the same file
    assert _load(Path(moved.best_model_path))["epoch"] == 0
    assert Path(moved.best_model_path).with_name("best-deploy.ckpt").is_file()
    assert _load(Path(moved.last_model_path))["epoch"] == 3


def test_configured_model_checkpoint_wins(tmp_path: Path, data: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        cli = fit_in_process(
            tmp_path,
            data,
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "1",
            "--trainer.callbacks+=ModelCheckpoint",
            "--trainer.callbacks.monitor=val/loss",
            "--trainer.callbacks.filename=mine",
        )
    [callback] = cli.trainer.checkpoint_callbacks
    assert type(callback) is ModelCheckpoint and callback.monitor == "val/loss"
    assert Path(callback.best_model_path).name == "mine.ckpt"
    assert "using the configured ModelCheckpoint(monitor='val/loss'" in caplog.text
