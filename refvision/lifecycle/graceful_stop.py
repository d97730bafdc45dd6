"""SIGTERM / SIGINT during a fit: finish the current batch, write a resumable ``last.ckpt``, exit."""

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger("refvision")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(SystemExit):
    """A fit stopped by a signal; exits with the shell's status for it (128 + signal number)."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class StopOnSignal(Callback):
    """Turns SIGTERM (a preempted node) and SIGINT (Ctrl-C) into a clean stop.

    The signal is noted; at the end of the running training batch every rank raises
    :class:`TrainingInterrupted`, and ``last.ckpt`` is written (in the checkpoint callback's
    folder) before the process exits with status 128 + signal. A signal noted during a validation
    stops the fit when that validation ends instead (``trainer.should_stop``): the ``last.ckpt`` then
    written (by :class:`~refvision.lifecycle.run_checkpoint.RunCheckpoint`, at the epoch's end when it
    is the epoch-end validation) is kept as it is, so that the resume is exact, and the process exits
    the same way. A second SIGINT aborts at once. The previous handlers are back once training ends.
    """

    def __init__(self) -> None:
        self._signum: int | None = None
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._signum = None
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._signum = signum
        log.warning("received %s: stopping after this batch and writing last.ckpt", signal.Signals(signum).name)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.strategy.reduce_boolean_decision(self._signum is not None, all=False):
            raise TrainingInterrupted(self._signum or signal.SIGTERM)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if trainer.strategy.reduce_boolean_decision(self._signum is not None, all=False):
            trainer.should_stop = True

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_handlers()
        if trainer.should_stop and self._signum is not None:
            raise TrainingInterrupted(self._signum)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if not isinstance(exception, TrainingInterrupted):
            return
        checkpoint = trainer.checkpoint_callback
        if not isinstance(checkpoint, ModelCheckpoint) or checkpoint.dirpath is None:
            log.warning(
                "stopped by %s with no checkpoint folder: nothing written", signal.Signals(exception.signum).name
            )
            return
        path = os.path.join(checkpoint.dirpath, ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION)
        if getattr(checkpoint, "last_saved_step", None) != trainer.global_step or not os.path.isfile(path):
            checkpoint.last_model_path = path
            trainer.save_checkpoint(path)
        log.warning(
            "stopped by %s at epoch %d, step %d: resume with --ckpt_path %s",
            signal.Signals(exception.signum).name,
            trainer.current_epoch,
            trainer.global_step,
            path,
        )

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
