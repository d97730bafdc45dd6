"""The switch made visible: a fit that starts from trained weights validates once before its first step.

Lightning's sanity check runs the validation loop before training (same batches, precision and
device handling as every validation, under ``isolate_rng`` so training draws the same random
numbers with or without it). For a fit that starts fresh (no ``--ckpt_path``) :class:`StartValidation`
widens it to the whole validation set (``limit_val_batches`` still applies) and logs the task's
validation metrics as ``val_start/<key>`` at step 0, e.g. ``val_start/top1``. Lightning discards
what is logged during the sanity check, so the values are read from the task's metric at the end of
that validation epoch (callback hooks run before the task's own, which computes and resets it; the
task's compute then returns the cached result) and written to the loggers directly.
"""

from typing import Any

from lightning import Callback, LightningModule, Trainer


class StartValidation(Callback):
    """Log ``val_start/<key>`` (step 0) from a full validation before the first training step.

    The task must have ``eval_metrics["val"]`` (a torchmetrics metric whose ``compute()`` returns a
    dict of scalar tensors) and ``logged_metrics["val"]`` (the keys to log), as refvision's tasks do.
    A resumed fit (``--ckpt_path``) logs nothing here: its step 0 was logged by the run it resumes.
    """

    def __init__(self) -> None:
        self._active = False
        self._configured_steps: Any = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._active = trainer.ckpt_path is None and not trainer.fast_dev_run
        if self._active:
            self._configured_steps = trainer.num_sanity_val_steps
            trainer.num_sanity_val_steps = float("inf")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not (self._active and trainer.sanity_checking):
            return
        result = pl_module.eval_metrics["val"].compute()  # type: ignore[index]
        values = {f"val_start/{key}": float(result[key]) for key in pl_module.logged_metrics["val"]}  # type: ignore[attr-defined]
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
            logger.save()

    def on_sanity_check_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._active:
            trainer.num_sanity_val_steps = self._configured_steps
            self._active = False
