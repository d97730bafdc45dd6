"""The one place that decides how the data modules build their data loaders."""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from refvision.data.bad_samples import DropBadSamples, SkippingDataLoader
from refvision.data.description import DescribedDataModule


def check_counts(minimum: int = 1, **options: int | Sequence[int] | None) -> None:
    """Raise a one-line ``ValueError`` naming ``data.<option>`` unless each value is an integer >= ``minimum``.

    A value may be a sequence (a ``(H, W)`` size: each element is checked) or ``None`` (not set,
    passes). Data modules check their batch sizes, image sizes and worker counts with it when
    built, before PyTorch or torchvision meet the value deep inside a data loader or transform.
    """
    expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    for name, value in options.items():
        items = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(item, bool) or not isinstance(item, int) or item < minimum for item in items):
            each = " for each element" if isinstance(value, (list, tuple)) else ""
            raise ValueError(f"data.{name}={value!r}: expected {expected}{each}")


def pins_memory(requested: bool, device: torch.device | None) -> bool:
    """Whether a loader asked for ``pin_memory`` pins its batches: only where they go to an accelerator
    that copies from pinned memory (CUDA, XPU, ...; not MPS, which PyTorch does not pin for).

    ``device`` is where the batches go (a trainer's root device); ``None``: unknown, so the accelerator
    present decides. On the CPU pinning buys nothing, and PyTorch warns on every loader that asks.
    """
    if not requested or not torch.accelerator.is_available():
        return False
    accelerator = torch.accelerator.current_accelerator()
    if accelerator is None or accelerator.type == "mps":
        return False
    return device is None or device.type != "cpu"


def batch_device(datamodule: LightningDataModule) -> torch.device | None:
    """The device the batches of ``datamodule``'s loaders go to: its trainer's root device, ``None`` without one."""
    trainer = datamodule.trainer
    return trainer.strategy.root_device if trainer is not None else None


def make_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    num_workers: int,
    pin_memory: bool,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    device: torch.device | None = None,
) -> DataLoader:
    """Training loaders shuffle and drop the last partial batch; the others keep order and every sample.

    ``pin_memory`` is what the data module was asked for; the loader pins only where the batches go to
    an accelerator (:func:`pins_memory`, ``device`` where they go).

    Evaluation workers persist across epochs. Training workers start afresh each epoch: their
    seeds then derive from the main process's random state at the epoch start, which every
    checkpoint holds, so a resumed fit draws the same augmentations as an uninterrupted one.
    Samples a dataset returns as ``BadSample`` (its ``on_bad_sample="skip"``) are dropped from
    their batch and reported by name when the pass over the loader ends (see
    :mod:`refvision.data.bad_samples`).
    """
    return SkippingDataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train,
        num_workers=num_workers,
        pin_memory=pins_memory(pin_memory, device),
        persistent_workers=num_workers > 0 and not train,
        collate_fn=DropBadSamples(collate_fn),
    )


class SplitDataModule(DescribedDataModule):
    """Base of the data modules: the train / val / test / predict loaders over their datasets.

    Subclasses set ``description`` (see :class:`~refvision.data.description.DescribedDataModule`;
    its statistics are their ``mean`` / ``std`` init arguments, which they save as
    hyper-parameters, as the model does), ``batch_size``, ``num_workers`` and ``pin_memory`` (honoured
    where the batches go to an accelerator, see :func:`pins_memory`) in ``__init__`` and ``train_set`` /
    ``val_set`` / ``test_set`` in ``setup`` (``test_set`` also serves predict).
    :attr:`eval_batch_size` sizes the val / test / predict loaders, :attr:`collate_fn` batches
    the samples (``None``: PyTorch's default collate).
    """

    collate_fn: Callable[[list[Any]], Any] | None = None
    batch_size: int
    num_workers: int
    pin_memory: bool
    train_set: Dataset
    val_set: Dataset
    test_set: Dataset

    @property
    def eval_batch_size(self) -> int:
        """Batch size of the val / test / predict loaders; the training one by default."""
        return self.batch_size

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        batch_size = self.batch_size if train else self.eval_batch_size
        return make_loader(
            dataset, batch_size, train, self.num_workers, self.pin_memory, self.collate_fn, batch_device(self)
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
