"""What every prediction writer shares: outputs named after input files, and no silent overwrite."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist
from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from refvision.data.bad_samples import describe
from refvision.data.predict import Source
from refvision.outputs.writers.sources import sources
from refvision.utils.atomic_file import check_writable

MAX_LISTED = 5
"""Existing files named in an overwrite refusal (the count is always given)."""


class OutputExistsError(FileExistsError):
    """A prediction would overwrite files of an earlier one; the message names the folder and the fix."""


class FileWriter(BasePredictionWriter):
    """Base of the writers: resolves each sample's :class:`Source` and refuses to overwrite.

    Before the first batch it lists every file the run would write (:meth:`planned_files`) and
    raises :class:`OutputExistsError` if any exists, unless ``overwrite``, and ``PermissionError`` if a
    folder they go to cannot be written (read-only); the checks run before any prediction, so a
    refused run loses nothing. Inputs whose outputs would collide (``a.jpg`` and ``a.png`` under a
    writer that names outputs ``a``: :meth:`output_name`) are one error listing every such group.
    Per-image files are written as batches
    finish; files that collect all images (:meth:`write_collected`) are written once by rank 0
    from the records of every process.
    """

    def __init__(self, output_dir: str, overwrite: bool = False) -> None:
        super().__init__(write_interval="batch_and_epoch")
        self.output_dir = Path(output_dir)
        self.overwrite = overwrite
        self._sources: list[list[Source]] = []
        self._records: dict[tuple[int, int], Any] = {}

    def planned_files(self, trainer: Trainer, sources: list[Source]) -> list[Path]:
        """Every file a run over ``sources`` writes."""
        raise NotImplementedError

    def output_name(self, source: Source) -> str | None:
        """The name this writer's outputs of ``source`` go by (``None``: the full file name is kept, no
        two inputs collide). By default the input's name without its suffix (``Source.name``)."""
        return str(source.name)

    def write_collected(self, trainer: Trainer, records: list[tuple[Source, Any]]) -> None:
        """Write the files that gather all images from ``records`` (in dataset order); rank 0 only."""

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loaders = trainer.predict_dataloaders
        loaders = loaders if isinstance(loaders, Sequence) else [loaders]
        self._sources = [sources(loader.dataset) for loader in loaders]
        self._records = {}
        every = [source for group in self._sources for source in group]
        inputs: dict[str, list[Path]] = {}
        for source in every:
            name = self.output_name(source)
            if name is not None and source.file not in inputs.setdefault(name, []):
                inputs[name].append(source.file)
        collisions = {name: files for name, files in inputs.items() if len(files) > 1}
        if collisions:
            listed = "; ".join(f"'{name}': {', '.join(map(str, files))}" for name, files in collisions.items())
            raise ValueError(
                f"{len(collisions)} output name(s) of {type(self).__name__} would each be written by more than one "
                f"input file; rename all but one file of each: {listed}"
            )
        planned = self.planned_files(trainer, every)
        for folder in sorted({path.parent for path in planned}):
            check_writable(folder / "probe", f"output_dir {self.output_dir}")
        existing = [path for path in planned if path.exists()]
        if existing and not self.overwrite:
            listed = ", ".join(str(p) for p in existing[:MAX_LISTED])
            raise OutputExistsError(
                f"output_dir {self.output_dir} already holds {len(existing)} of the files this prediction would "
                f"write ({listed}{', ...' if len(existing) > MAX_LISTED else ''}); choose another folder "
                "(--trainer.callbacks.output_dir) or pass --trainer.callbacks.overwrite true to replace them"
            )
        trainer.strategy.barrier("prediction writer checked its output folder")

    def batch_samples(
        self, trainer: Trainer, batch: Any, batch_indices: Sequence[int] | None, dataloader_idx: int, count: int
    ) -> tuple[list[int], list[Source]]:
        """Dataset indices and sources of one batch's ``count`` samples.

        A predict-folder batch ``(images, infos)`` says the index of each of its samples; that holds
        when bad samples were left out of it (``on_bad_sample: skip``). For other data the indices
        are those Lightning tracked from the sampler, which no longer match the batch once a
        sample was left out: that is an error rather than outputs under other files' names.
        """
        infos = batch[1] if isinstance(batch, (tuple, list)) and len(batch) == 2 else None
        if isinstance(infos, list) and len(infos) == count and all(isinstance(i, dict) and "index" in i for i in infos):
            indices = [int(info["index"]) for info in infos]
        else:
            loaders = trainer.predict_dataloaders
            loader = loaders[dataloader_idx] if isinstance(loaders, Sequence) else loaders
            skipped = getattr(loader, "skipped", [])
            if skipped:
                raise ValueError(
                    f"{len(skipped)} bad sample(s) were left out of the predicted batches ({describe(skipped)}), and "
                    f"{type(loader.dataset).__name__} does not say which file each remaining sample is; fix or "
                    "remove the files, or predict with refvision.data.PredictImagesDataModule"
                )
            if batch_indices is None or len(batch_indices) != count:
                raise RuntimeError(
                    f"{type(self).__name__} needs the dataset indices of each predicted batch from Lightning"
                )
            indices = list(batch_indices)
        return indices, [self._sources[dataloader_idx][index] for index in indices]

    def collect(self, batch_indices: Sequence[int], dataloader_idx: int, records: Sequence[Any]) -> None:
        """Keep one record per sample for :meth:`write_collected`."""
        for index, record in zip(batch_indices, records):
            self._records[(dataloader_idx, index)] = record

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any]
    ) -> None:
        records = dict(self._records)
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            gathered: list[dict[tuple[int, int], Any]] = [{} for _ in range(trainer.world_size)]
            dist.all_gather_object(gathered, self._records)
            for part in gathered:  # a distributed sampler may repeat samples to even out ranks
                records.update(part)
        if trainer.is_global_zero:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.write_collected(trainer, [(self._sources[d][i], records[(d, i)]) for d, i in sorted(records)])
