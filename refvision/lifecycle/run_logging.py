"""What a run logs beyond its metrics: the learning rate, and its hyper-parameters with the metrics they gave.

TensorBoard's HParams view compares runs by their hyper-parameters and final metrics. Lightning
logs the hyper-parameters when a run starts, with a constant ``hp_metric`` of -1 unless told
otherwise; refvision's TensorBoard logger is made with ``default_hp_metric=False`` and
:class:`HParamsWithMetrics` logs the hyper-parameters once more when ``fit`` / ``test`` ends,
together with the metrics reached, so that the HParams table holds real numbers.
"""

import math
from typing import Any

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only


class HParamsWithMetrics(Callback):
    """At the end of ``fit``: the hyper-parameters with ``hp/best_<monitor>`` (the best checkpoint's score)
    and ``hp/last_<monitor>`` (the last validation's); at the end of ``test``: with ``hp/<test metric>`` for
    every scalar ``test/*`` metric (and ``hp/best_<monitor>`` after a fit by the same Trainer). Written to
    every TensorBoard logger (rank 0). Where a test follows a fit in one Trainer (one folder), TensorBoard's
    EventAccumulator takes the first set written, the fit's; the test's ``hp/test/*`` scalars are there too."""

    def __init__(self, monitor: str) -> None:
        self.monitor = monitor

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = self._best(trainer)
        metrics[f"hp/last_{self.monitor}"] = _scalar(trainer.callback_metrics.get(self.monitor))
        _log(trainer, pl_module, metrics)

    @rank_zero_only
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A test after a fit in the same Trainer writes into the fit's folder: keep its best score beside.
        metrics = self._best(trainer)
        metrics.update({f"hp/{k}": _scalar(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
        _log(trainer, pl_module, metrics)

    def _best(self, trainer: Trainer) -> dict[str, float]:
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.monitor == self.monitor:
            return {f"hp/best_{self.monitor}": _scalar(checkpoint.best_model_score)}
        return {}


def _scalar(value: Any) -> float:
    """A logged metric as a float; NaN where there is none (no validation ran)."""
    if value is None or getattr(value, "numel", lambda: 1)() != 1:
        return math.nan
    return float(value)


def _log(trainer: Trainer, pl_module: LightningModule, metrics: dict[str, float]) -> None:
    metrics = {k: v for k, v in metrics.items() if not math.isnan(v)}
    if not metrics:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(dict(pl_module.hparams), metrics)


def run_logging_callbacks(trainer: Trainer, monitor: str) -> list[Callback]:
    """The logging callbacks a run with a logger gets: :class:`HParamsWithMetrics` and, unless one is
    configured (``trainer.callbacks``), a ``LearningRateMonitor`` logging ``lr-<optimizer>`` every step."""
    if not trainer.loggers:
        return []
    callbacks: list[Callback] = [HParamsWithMetrics(monitor)]
    if not any(isinstance(c, LearningRateMonitor) for c in trainer.callbacks):
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return callbacks
