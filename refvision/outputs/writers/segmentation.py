"""Segmentation predictions: label PNGs (class ids, or Cityscapes label ids) plus colour and overlay images."""

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from lightning import LightningModule, Trainer
from torch import Tensor
from torchvision.io import write_png
from torchvision.utils import draw_segmentation_masks

from refvision.data.cityscapes_labels import label_ids
from refvision.data.predict import Source, read_rgb
from refvision.outputs.drawing import append_legend
from refvision.outputs.writers.base import FileWriter
from refvision.outputs.writers.classification import class_names_of

CITYSCAPES_NAME = re.compile(r"[^_]+_\d{6}_\d{6}")
"""``<city>_<seq>_<frame>``: what cityscapesScripts' evaluator looks for at the start of a file name."""
FOLDERS = ("labels", "color", "overlay")


class SegmentationPredictionWriter(FileWriter):
    """Write each prediction as PNGs named after its input image, in three sibling folders.

    For an input named ``<name>`` (its path without suffix, sub-folders kept; for Cityscapes
    ``<city>/<city>_<seq>_<frame>_leftImg8bit``):

    - ``labels/<name>.png``: one ``uint8`` channel, the predicted class ids (train ids), or with
      ``cityscapes: true`` the official label ids of the classes the model names (its
      ``class_names``, the data module's: road 7, ..., bicycle 33);
    - ``color/<name>.png``: the classes in the model's palette (``model.palette``: the data module's,
      Cityscapes colours for Cityscapes);
    - ``overlay/<name>.png``: the input image with the coloured classes blended in at ``alpha``,
      and below it a legend band naming each class it shows, with its colour (the model's
      ``class_names``, else the class ids): taller than the input by the band, as wide unless a
      class name is wider (see :func:`~refvision.outputs.drawing.append_legend`).

    With ``cityscapes: true``, ``<output_dir>/labels`` is a folder that cityscapesScripts'
    ``evalPixelLevelSemanticLabeling`` (``CITYSCAPES_RESULTS``) and the Cityscapes server take as
    is: exactly one ``<city>_<seq>_<frame>*.png`` per image, label ids, full resolution. Input
    names must then start with ``<city>_<seq>_<frame>`` and predictions must have the input's
    size (checked, naming the file). Colour and overlay images stay out of that folder.
    """

    def __init__(self, output_dir: str, cityscapes: bool = False, alpha: float = 0.5, overwrite: bool = False) -> None:
        super().__init__(output_dir, overwrite)
        self.cityscapes, self.alpha = cityscapes, alpha

    def planned_files(self, trainer: Trainer, sources: list[Source]) -> list[Path]:
        if self.cityscapes:
            for source in sources:
                if CITYSCAPES_NAME.match(source.name.name) is None:
                    raise ValueError(
                        f"cityscapes: true needs input files named <city>_<seq>_<frame>*, got {source.file}"
                    )
            self._label_ids(class_names_of(trainer, None))
        return [self.output_dir / folder / f"{source.name}.png" for source in sources for folder in FOLDERS]

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Sequence[Tensor],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        colors: Tensor = pl_module.palette  # a SegmentationTask's (num_classes, 3) uint8 colours
        names = class_names_of(trainer, None)
        _, sources = self.batch_samples(trainer, batch, batch_indices, dataloader_idx, len(prediction))
        for source, pred in zip(sources, prediction):
            pred = pred.detach().cpu()
            if int(pred.max()) >= len(colors):
                raise ValueError(
                    f"prediction for {source.file} holds class {int(pred.max())}; the model has {len(colors)}"
                )
            image = read_rgb(source.file)
            labels = pred
            if self.cityscapes:
                if pred.shape != image.shape[-2:]:
                    raise ValueError(
                        f"prediction for {source.file} is {tuple(pred.shape)} (H, W) but the image is "
                        f"{tuple(image.shape[-2:])}; the Cityscapes evaluator needs full resolution "
                        f"(drop data.eval_size)"
                    )
                labels = self._label_ids(names)[pred.long()]
            self._write(labels.unsqueeze(0), "labels", source)
            self._write(colors[pred.long()].permute(2, 0, 1).contiguous(), "color", source)
            self._write(self.overlay(image, pred, colors, names), "overlay", source)

    def _label_ids(self, class_names: Sequence[str] | None) -> Tensor:
        """``(num_classes,) uint8``: the official Cityscapes label id of each class the model names."""
        if class_names is None:
            raise ValueError(
                "cityscapes: true needs a model with class_names (Cityscapes label names, which the Cityscapes "
                "data module gives it); this one has none: predict with --data.class_names cityscapes"
            )
        return label_ids(class_names)

    def _write(self, image: Tensor, folder: str, source: Source) -> None:
        path = self.output_dir / folder / f"{source.name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_png(image, str(path))

    def overlay(self, image: Tensor, pred: Tensor, colors: Tensor, class_names: Sequence[str] | None) -> Tensor:
        """``uint8 (3, H + B, W')``: ``image`` ``(3, H, W)`` with ``pred`` (resized to it by nearest neighbour)
        blended in, over a legend band naming the classes shown (by ``class_names``, else id); see
        :func:`~refvision.outputs.drawing.append_legend`."""
        if pred.shape != image.shape[-2:]:
            pred = F.interpolate(pred[None, None].float(), size=image.shape[-2:], mode="nearest")[0, 0].to(pred.dtype)
        classes = pred.unique()
        masks = pred.unsqueeze(0) == classes.view(-1, 1, 1)
        ids = classes.long().tolist()
        shown = [tuple(colors[c].tolist()) for c in ids]
        blended = draw_segmentation_masks(image, masks, alpha=self.alpha, colors=shown)
        names = [class_names[c] if class_names is not None else str(c) for c in ids]
        return append_legend(blended, list(zip(names, shown)))
