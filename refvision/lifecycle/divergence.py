"""Stop a fit whose loss or weights become NaN / inf, before anything is written from them."""

from collections.abc import Mapping
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from torch import Tensor

from refvision.utils.listing import first_and_more


class TrainingDiverged(RuntimeError):
    """The training loss or the weights stopped being finite."""


def non_finite_tensors(state: Mapping[str, Any]) -> list[str]:
    """Keys of the floating-point tensors in ``state`` that hold a NaN or an infinity."""
    return [
        k
        for k, v in state.items()
        if isinstance(v, Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


def _listed(keys: list[str]) -> str:
    return first_and_more(keys, 5)


class DivergenceGuard(Callback):
    """Raises :class:`TrainingDiverged` (naming epoch, step and value) when the fit diverges.

    Checks the training loss before each backward pass, so the weights of the last good step are
    still finite; the weights (parameters and buffers) before each validation; and the state dict
    of every checkpoint before it is written, so no checkpoint (and so no deploy checkpoint or
    export) holds non-finite weights.
    """

    def __init__(self) -> None:
        self._batch_idx = 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        if not bool(torch.isfinite(loss).all()):
            raise TrainingDiverged(
                f"the training loss is {loss.detach().float().max().item()} at epoch {trainer.current_epoch}, "
                f"step {trainer.global_step} (batch {self._batch_idx}); the fit stops before this step changes "
                "the weights. Lower model.optim.lr, add warm-up (model.optim.warmup_epochs) or check the data."
            )

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        bad = non_finite_tensors(pl_module.state_dict())
        if bad:
            raise TrainingDiverged(
                f"non-finite weights at epoch {trainer.current_epoch}, step {trainer.global_step}: {_listed(bad)}"
            )

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        bad = non_finite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise TrainingDiverged(
                f"refusing to write a checkpoint with non-finite weights at epoch "
                f"{trainer.current_epoch}, step {trainer.global_step}: {_listed(bad)}"
            )
