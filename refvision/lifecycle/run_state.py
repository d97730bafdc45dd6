"""The random state of a training run, saved in every checkpoint so that a resumed fit replays exactly.

A run draws from four generators in the main process: torch (CPU and each CUDA device), numpy and
Python's ``random``. The data loader draws its shuffling seed and its workers' base seed from
torch's when an epoch's iterator is created; the workers seed torch, numpy and ``random`` from
that base seed (Lightning's ``seed_everything(workers=True)``). So restoring the main-process
generators at an epoch boundary restores the loader's order and its workers' augmentations too.
Everything is stored as tensors and plain Python values, loadable with ``weights_only=True``.
"""

import random
from typing import Any

import numpy as np
import torch
from lightning import Callback, LightningModule, Trainer


def random_states() -> dict[str, Any]:
    """The state of every random generator of this process."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "python": (version, list(internal), gauss_next),
    }


def set_random_states(states: dict[str, Any]) -> None:
    """Restore what :func:`random_states` returned (CUDA states only where the devices exist)."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"][: torch.cuda.device_count()])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


class RandomStateCheckpoint(Callback):
    """Saves :func:`random_states` in each checkpoint and restores them on resume.

    Validation is kept off the training streams: the state after the last training batch is
    put back when validation ends, so the checkpoint written at the end of validation holds the
    state the next epoch starts from, whether or not the run is interrupted there.
    """

    def __init__(self) -> None:
        self._before_validation: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"random_states": random_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_random_states(state_dict["random_states"])

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._before_validation = random_states()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking and self._before_validation is not None:
            set_random_states(self._before_validation)
