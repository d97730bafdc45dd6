"""Classification predictions as one CSV: each input file with its top-k classes and probabilities."""

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning import LightningModule, Trainer
from torch import Tensor

from refvision.data.predict import Source
from refvision.outputs.writers.base import FileWriter


def class_names_of(trainer: Trainer, given: Sequence[str] | None) -> Sequence[str] | None:
    """``given``, else the model's ``class_names`` (its checkpoint's, which the data module set), else
    ``None`` (classes shown by number)."""
    return given or getattr(trainer.lightning_module, "class_names", None)


class ClassificationPredictionWriter(FileWriter):
    """Write ``<output_dir>/predictions.csv``, one row per input image in dataset order.

    Columns: ``file`` (the input's name with its suffix, sub-folders kept: ``street/img_001.jpg``),
    then ``class_1, prob_1, ..., class_k, prob_k``, the ``k = min(5, num_classes)`` most probable
    classes by descending softmax probability. Classes are named by ``class_names``, else the
    model's ``class_names``, else their index. Consumes
    :meth:`~refvision.tasks.classification.ClassificationTask.predict_step` outputs.
    """

    def __init__(self, output_dir: str, class_names: list[str] | None = None, overwrite: bool = False) -> None:
        super().__init__(output_dir, overwrite)
        self.class_names = class_names

    def planned_files(self, trainer: Trainer, sources: list[Source]) -> list[Path]:
        return [self.output_dir / "predictions.csv"]

    def output_name(self, source: Source) -> None:
        """Rows keep the input's full name, suffix included: ``a.jpg`` and ``a.png`` do not collide."""
        return None

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: dict[str, Tensor],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        classes, probs = prediction["classes"].cpu().tolist(), prediction["probs"].double().cpu().tolist()
        indices, _ = self.batch_samples(trainer, batch, batch_indices, dataloader_idx, len(classes))
        self.collect(indices, dataloader_idx, list(zip(classes, probs)))

    def write_collected(self, trainer: Trainer, records: list[tuple[Source, Any]]) -> None:
        names = class_names_of(trainer, self.class_names)
        k = max((len(classes) for _, (classes, _) in records), default=0)
        header = ["file"] + [f"{field}_{i}" for i in range(1, k + 1) for field in ("class", "prob")]
        with (self.output_dir / "predictions.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for source, (classes, probs) in records:
                row = [f"{source.name}{source.file.suffix}"]
                for label, prob in zip(classes, probs):
                    row += [names[label] if names is not None else str(label), f"{prob:.6f}"]
                writer.writerow(row)
