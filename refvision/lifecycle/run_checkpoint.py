"""The checkpoints of a fit: ``best.ckpt`` by the task's metric, ``last.ckpt`` at every validation.

``RunCheckpoint`` is Lightning's ``ModelCheckpoint`` with two changes. ``last.ckpt`` is written
at the end of every validation (epoch end or ``val_check_interval`` point; at epoch end when there
is no validation), whatever the monitored metric did. And a resumed fit keeps the whole run's best:
when it resumes into another folder (a new logger version or ``default_root_dir``), the previous
``best.ckpt`` is brought into its own folder with its score; nothing is written to the old folder.

No training state is stored twice. When ``best.ckpt`` was written at the step ``last.ckpt`` is due,
the two hold the same state, and ``last.ckpt`` becomes a hard link to ``best.ckpt``; the best carried
into a resumed run's folder is a hard link to the old one. Every save replaces its file by a rename
(``AtomicCheckpointIO``), so a later ``best.ckpt`` or ``last.ckpt`` never changes the other name's
contents. Links are made only while refvision's atomic writer saves the checkpoints, and where the
filesystem has none the file is copied.

A fit never writes into a checkpoint folder that holds another run's ``last.ckpt`` (its resume point):
the command checks :func:`taken_checkpoint_folders` before the fit writes anything.

``AtomicCheckpoints`` makes every checkpoint of the fit appear atomically (see
``refvision.utils.atomic_file``) and deletes temporaries that killed runs left in the checkpoint folders.
"""

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from refvision.utils.atomic_file import copy_atomically, link_atomically, remove_stale_temporaries, save_atomically


class DiskFull(OSError):
    """A checkpoint that did not fit on its device; the message names the folder and the free space."""


@contextlib.contextmanager
def explained_disk_full(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise a full device while writing checkpoint ``path`` as one :class:`DiskFull` line.

    torch's zip writer reports it as ``RuntimeError: [enforce fail at inline_container.cc] unexpected
    pos``, after the ``OSError`` (errno 28) of the underlying write; both are recognised.
    """
    try:
        yield
    except (OSError, RuntimeError) as err:
        if not _is_disk_full(err):
            raise
        folder = Path(path).parent
        free = shutil.disk_usage(folder).free if folder.is_dir() else 0
        raise DiskFull(
            errno.ENOSPC,
            f"no space left on the device of {folder} ({free / 2**20:.1f} MiB free) while writing "
            f"{Path(path).name}; the checkpoints already there are intact: free space there, or resume "
            "with another --trainer.default_root_dir",
        ) from err


def _is_disk_full(err: BaseException | None) -> bool:
    while err is not None:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        if isinstance(err, RuntimeError) and "unexpected pos" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves go through :func:`refvision.utils.atomic_file.save_atomically`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with explained_disk_full(path):
            save_atomically(checkpoint, path)


class AtomicCheckpoints(Callback):
    """Installs :class:`AtomicCheckpointIO` and cleans stale temporaries when a fit starts.

    A checkpoint IO configured by the user (``trainer.plugins``) is kept, with a warning.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        current = trainer.strategy.checkpoint_io
        if type(current) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        elif not isinstance(current, AtomicCheckpointIO):
            rank_zero_warn(
                f"checkpoints are written by the configured {type(current).__name__}, not by refvision's atomic writer"
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        folders = {c.dirpath for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)}
        if trainer.ckpt_path and "://" not in str(trainer.ckpt_path):
            folders.add(str(Path(trainer.ckpt_path).parent))
        for folder in folders:
            for path in remove_stale_temporaries(folder):
                rank_zero_info(f"removed {path}, a partial file left by a killed run")


class RunCheckpoint(ModelCheckpoint):
    """``best.ckpt`` (top-1 by ``monitor``) and ``last.ckpt`` after every validation; see the module docstring.

    Args:
        monitor: the validation metric that picks ``best.ckpt``.
        mode: ``min`` or ``max``.
        **kwargs: other ``ModelCheckpoint`` arguments (``dirpath`` ...); ``filename``,
            ``save_top_k`` and ``save_last`` are fixed.
    """

    def __init__(self, monitor: str, mode: str, **kwargs: Any) -> None:
        super().__init__(
            monitor=monitor,
            mode=mode,
            filename="best",
            save_top_k=1,
            save_last=False,
            auto_insert_metric_name=False,
            **kwargs,
        )
        self.best_model_step: int | None = None
        self.last_saved_step: int | None = None
        self._best_saved_step: int | None = None
        self._carried_best: str | None = None

    @property
    def last_path(self) -> str:
        return os.path.join(self.dirpath or "", self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)

    # ``last.ckpt`` is written right after the point where Lightning decides ``best.ckpt`` (the end of
    # the training epoch, or of a validation when it runs several times an epoch or every n epochs),
    # so that it records that decision; and at every epoch end.
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._save_last(trainer)

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        if filepath != self.best_model_path:
            super()._save_checkpoint(trainer, filepath)
            return
        # A new best.ckpt, decided just before last.ckpt is due at this step: it records what
        # last.ckpt will (its step as the best's, last.ckpt's path), so that it can stand for it.
        self.best_model_step = trainer.global_step
        self.last_model_path = self.last_path
        super()._save_checkpoint(trainer, filepath)
        self._best_saved_step = trainer.global_step

    def _save_last(self, trainer: Trainer) -> None:
        if (
            trainer.sanity_checking
            or trainer.state.fn != "fit"
            or trainer.fast_dev_run
            or self.last_saved_step == trainer.global_step
        ):
            return
        self.last_model_path = self.last_path
        self.last_saved_step = trainer.global_step
        if self._best_saved_step == trainer.global_step and _links_safely(trainer, self.best_model_path):
            if trainer.is_global_zero:
                with explained_disk_full(self.last_path):
                    link_atomically(self.best_model_path, self.last_path)
            trainer.strategy.barrier("RunCheckpoint.last")
        else:
            trainer.save_checkpoint(self.last_path, self.save_weights_only)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_model_step": self.best_model_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_model_step = state_dict.get("best_model_step")
        previous = state_dict.get("dirpath")
        if previous is None or self.dirpath is None or os.path.abspath(previous) == os.path.abspath(self.dirpath):
            super().load_state_dict(state_dict)
            return
        # Resumed into another folder: the best so far moves here (copied in on_fit_start).
        self._carried_best = state_dict.get("best_model_path") or None
        here = self._here
        super().load_state_dict(
            {
                **state_dict,
                "dirpath": self.dirpath,
                "best_model_path": here(state_dict.get("best_model_path")),
                "kth_best_model_path": here(state_dict.get("kth_best_model_path")),
                "last_model_path": here(state_dict.get("last_model_path")),
                "best_k_models": {here(k): v for k, v in (state_dict.get("best_k_models") or {}).items()},
            }
        )

    def _here(self, path: str | None) -> str:
        return os.path.join(self.dirpath or "", os.path.basename(path)) if path else ""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.best_model_path:
            return
        source = self._carried_best or self.best_model_path
        problem = None
        if trainer.is_global_zero:
            problem = _best_problem(source, self.best_model_step)
            if problem is None and self._carried_best:
                with explained_disk_full(self.best_model_path):
                    linked = _links_safely(trainer, source) and link_atomically(source, self.best_model_path)
                    if not linked:
                        copy_atomically(source, self.best_model_path)
                rank_zero_info(
                    f"resumed run: best so far ({self.monitor}={float(self.best_model_score):.6g}) "
                    f"{'linked' if linked else 'copied'} from {source} to {self.best_model_path}"
                )
        problem = trainer.strategy.broadcast(problem)
        self._carried_best = None
        if problem is not None:
            rank_zero_warn(f"resumed run: {problem}; best.ckpt will be the best of the epochs from here on")
            worst = torch.tensor(float("inf") if self.mode == "min" else -float("inf"))
            self.best_k_models = {self.best_model_path: worst}
            self.kth_best_model_path, self.kth_value, self.best_model_score = self.best_model_path, worst, worst
            self.best_model_step = None


def checkpoint_folder(trainer: Trainer, dirpath: str | None = None) -> str:
    """The folder a ``ModelCheckpoint`` with ``dirpath`` writes to in ``trainer``'s fit, found as Lightning finds it:
    ``dirpath`` if given, else ``checkpoints`` in the first logger's version folder, else in ``default_root_dir``."""
    if dirpath is not None:
        return str(dirpath)
    if trainer.loggers:
        logger = trainer.loggers[0]
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        return os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version, "checkpoints")
    return os.path.join(trainer.default_root_dir, "checkpoints")


def taken_checkpoint_folders(trainer: Trainer, ckpt_path: str | None) -> list[str]:
    """The checkpoint folders of the coming fit of ``trainer`` that already hold a ``last.ckpt`` of
    another run: every folder but the one the fit resumes from (``ckpt_path`` inside it, or ``last``).

    The folders are refvision's own (:func:`checkpoint_folder`) and those of configured
    ``ModelCheckpoint`` callbacks. Call it before the fit starts: the trainer's loggers pick their
    version here, as the fit will.
    """
    folders = {checkpoint_folder(trainer)}
    folders |= {
        checkpoint_folder(trainer, c.dirpath) for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)
    }
    resumed = None
    if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and "://" not in str(ckpt_path):
        resumed = os.path.realpath(os.path.dirname(os.path.abspath(ckpt_path)))
    return sorted(
        folder
        for folder in folders
        if os.path.isfile(os.path.join(folder, ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION))
        and ckpt_path != "last"
        and os.path.realpath(folder) != resumed
    )


def _links_safely(trainer: Trainer, path: str) -> bool:
    """Whether another name may be linked to the checkpoint file ``path``: a local file, and ``trainer``'s
    checkpoints saved by :class:`AtomicCheckpointIO` (a whole new file each time, never written in place)."""
    return isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO) and "://" not in str(path)


def _best_problem(path: str, step: int | None) -> str | None:
    """Why the best checkpoint ``path`` cannot stand for the run's best at ``step`` (None: it can)."""
    if not os.path.isfile(path):
        return f"its best checkpoint {path} is missing"
    if step is None:
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step")
    if saved != step:
        return f"{path} is from step {saved}, not from step {step} where the run's best was saved"
    return None
