"""The checkpoint files of a fit: ``last.ckpt`` is ``best.ckpt`` (one file, two names) where the two
coincide, a resumed run's carried best is the old file, replacing one name never changes the other,
resuming from a linked ``last.ckpt`` is exact, and a file holds the model and optimizer state, no more."""

import os
from pathlib import Path

import pytest
import torch
from fit_process import checkpoint_dir, file_hashes, fit_in_process
from lightning import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from refvision.app.demo.data import write_imagefolder
from refvision.lifecycle.run_checkpoint import AtomicCheckpoints, RunCheckpoint
from refvision.utils.atomic_file import link_atomically, save_atomically

VAL_LOSSES = (3.0, 2.0, 4.0, 1.0, 5.0)
"""The validation loss of each epoch: new bests at epochs 0, 1 and 3."""


class Scripted(LightningModule):
    """A linear model trained with AdamW on fixed data, whose validation loss is :data:`VAL_LOSSES`."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        generator = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(8, 4, generator=generator), torch.randn(8, 1, generator=generator))

    def training_step(self, batch: list[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return (self.layer(x) - y).pow(2).mean()

    def validation_step(self, batch: list[Tensor], batch_idx: int) -> None:
        self.log("val/loss", VAL_LOSSES[self.current_epoch])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=8)


class FilesAtEpochEnds(Callback):
    """Records, after each epoch's checkpoints are written, (best and last are one file, best's epoch, last's epoch)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.seen: list[tuple[bool, int, int]] = []

    def _record(self) -> None:
        best, last = self.folder / "best.ckpt", self.folder / "last.ckpt"
        self.seen.append((os.path.samefile(best, last), _load(best)["epoch"], _load(last)["epoch"]))

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch > 0 and (self.folder / "last.ckpt").exists():
            self._record()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._record()


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _fit(folder: Path, epochs: int, ckpt_path: Path | None = None) -> FilesAtEpochEnds:
    torch.manual_seed(0)
    files = FilesAtEpochEnds(folder)
    trainer = Trainer(
        max_epochs=epochs,
        callbacks=[RunCheckpoint(monitor="val/loss", mode="min", dirpath=str(folder)), AtomicCheckpoints(), files],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(folder.parent),
    )
    trainer.fit(Scripted(), ckpt_path=ckpt_path)
    return files


def _run_state(checkpoint: dict) -> dict:
    return next(v for k, v in checkpoint["callbacks"].items() if k.startswith("RunCheckpoint"))


def test_last_is_best_where_they_coincide(tmp_path: Path) -> None:
    files = _fit(tmp_path / "run", len(VAL_LOSSES))
    # After epochs 0, 1, 3 (new bests) last.ckpt is best.ckpt; after 2 and 4 it is its own file, and
    # replacing it (or best.ckpt, at epoch 3) left the other name's checkpoint as it was.
    assert files.seen == [(True, 0, 0), (True, 1, 1), (False, 1, 2), (True, 3, 3), (False, 3, 4)]
    best = _load(tmp_path / "run" / "best.ckpt")
    assert _run_state(best)["best_model_step"] == best["global_step"] == 8


def test_resume_from_a_linked_last_is_exact(tmp_path: Path) -> None:
    uninterrupted = tmp_path / "uninterrupted"
    _fit(uninterrupted, len(VAL_LOSSES))
    run = tmp_path / "run"
    assert _fit(run, 2).seen[-1] == (True, 1, 1)  # stopped where last.ckpt is best.ckpt
    stopped = file_hashes(run)

    # Into another folder: the best so far is carried as the same file; the old folder is untouched.
    moved = tmp_path / "moved"
    _fit(moved, 3, ckpt_path=run / "last.ckpt")
    assert os.path.samefile(moved / "best.ckpt", run / "best.ckpt")
    assert _load(moved / "last.ckpt")["epoch"] == 2
    assert file_hashes(run) == stopped

    # In its own folder, to the end: the same files as the uninterrupted run's.
    _fit(run, len(VAL_LOSSES), ckpt_path=run / "last.ckpt")
    for name in ("best.ckpt", "last.ckpt"):
        ours, theirs = _load(run / name), _load(uninterrupted / name)
        assert (ours["epoch"], ours["global_step"]) == (theirs["epoch"], theirs["global_step"])
        for key, value in theirs["state_dict"].items():
            assert torch.equal(ours["state_dict"][key], value), key
        for index, state in theirs["optimizer_states"][0]["state"].items():
            for key, value in state.items():
                assert torch.equal(ours["optimizer_states"][0]["state"][index][key], value), (index, key)
        assert _run_state(ours)["best_model_step"] == _run_state(theirs)["best_model_step"]
        assert float(_run_state(ours)["best_model_score"]) == float(_run_state(theirs)["best_model_score"])


def test_replacing_a_linked_name_keeps_the_other(tmp_path: Path) -> None:
    best, last = tmp_path / "best.ckpt", tmp_path / "last.ckpt"
    save_atomically({"step": 1}, best)
    assert link_atomically(best, last)
    assert link_atomically(best, last)  # again, onto itself: nothing changes, no temporary left
    assert os.path.samefile(best, last) and sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]
    save_atomically({"step": 2}, last)
    assert _load(best) == {"step": 1} and _load(last) == {"step": 2}


def test_link_across_filesystems_copies(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's folder")
    source = shm / f"refvision-link-{os.getpid()}.ckpt"
    try:
        save_atomically({"step": 1}, source)
        assert not link_atomically(source, tmp_path / "last.ckpt")
        assert _load(tmp_path / "last.ckpt") == {"step": 1}
    finally:
        source.unlink(missing_ok=True)


@pytest.mark.slow
def test_checkpoint_holds_model_and_optimizer_state_only(tmp_path: Path) -> None:
    data = write_imagefolder(tmp_path / "images", train_per_class=8, val_per_class=2, size=32)
    # RefConv: a frozen basis (a buffer) and trainable refocusing weights; AdamW (the demo's optimizer).
    cli = fit_in_process(
        tmp_path / "run",
        data,
        *(
            "-c",
            "configs/conv/refconv.yaml",
            "--allow_random_basis",
            "true",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "1",
        ),
    )
    model = cli.model
    assert cli.trainer.optimizers[0].__class__ is torch.optim.AdamW
    tensors = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    expected = tensors + 2 * trainable  # the weights and buffers, and AdamW's two moments per trainable weight
    folder = checkpoint_dir(tmp_path / "run")
    assert os.path.samefile(folder / "best.ckpt", folder / "last.ckpt")  # one epoch: the last is the best
    size = (folder / "best.ckpt").stat().st_size
    assert expected <= size <= 1.02 * expected + 256 * 1024, (size, expected)
