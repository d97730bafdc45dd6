"""A callback for subprocess fits in the tests: the process sends itself a real signal during a validation."""

import os
import signal

from lightning import Callback, LightningModule, Trainer


class SignalDuringValidation(Callback):
    """Sends ``signum`` to this process at the first validation batch of epoch ``epoch`` (not the sanity check)."""

    def __init__(self, epoch: int = 1, signum: int = int(signal.SIGTERM)) -> None:
        self.epoch = epoch
        self.signum = signum
        self._sent = False

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: object, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not trainer.sanity_checking and trainer.current_epoch == self.epoch and not self._sent:
            self._sent = True
            os.kill(os.getpid(), self.signum)
