"""Detection predictions: a JSON per run, drawn boxes per image, VOC devkit and COCO result files."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning import LightningModule, Trainer
from torchvision.io import write_png

from refvision.data.predict import Source, read_rgb
from refvision.outputs.drawing import draw_detections
from refvision.outputs.writers.base import FileWriter
from refvision.outputs.writers.classification import class_names_of
from refvision.outputs.writers.detection_formats import coco_results, voc_lines, voc_result_file, write_json
from refvision.utils.colors import label_color

Detection = dict[str, Any]


class DetectionPredictionWriter(FileWriter):
    """Write the detections of ``refvision predict`` under ``output_dir``.

    - ``detections.json``: one record per input image in dataset order, ``{"file", "boxes"
      (xyxy, 0-based continuous pixels of the input image), "scores", "labels", "class_names"}``,
      keeping detections with ``score >= score_threshold``;
    - ``boxes/<name>.png`` (when ``draw``): the input image with those boxes drawn, each labelled
      ``<class> <score>`` on a tag of the box's colour, text sized to the image
      (:func:`~refvision.outputs.drawing.draw_detections`; an image without such boxes is
      written as it is); ``<name>`` is the input's path without suffix, sub-folders kept;
    - ``coco_results.json``: every detection of the model (no threshold, as for scoring) as
      COCO results, ``image_id`` the input's name, ``category_id`` the model's ``category_ids`` of
      its COCO data, else its label (see ``refvision.outputs.writers.detection_formats``);
    - with ``voc_set`` (``"YEAR-SPLIT"``, e.g. ``"2007-test"``): the devkit's
      ``results/VOC<year>/Main/comp4_det_<split>_<class>.txt`` for every class, every detection,
      1-based VOC pixel coordinates, image id = the input's name (the VOC id for VOC data).

    ``class_names[label]`` names a label (background first): the given list, else the
    model's ``class_names``, else the label number (``voc_set`` requires names).
    """

    def __init__(
        self,
        output_dir: str,
        score_threshold: float = 0.3,
        class_names: list[str] | None = None,
        draw: bool = True,
        voc_set: str | None = None,
        overwrite: bool = False,
    ) -> None:
        super().__init__(output_dir, overwrite)
        self.score_threshold, self.class_names, self.draw, self.voc_set = score_threshold, class_names, draw, voc_set
        if voc_set is not None:
            voc_result_file(self.output_dir, voc_set, "probe")  # validates the spec now

    def _voc_files(self, names: Sequence[str] | None) -> list[Path]:
        if self.voc_set is None:
            return []
        if names is None:
            raise ValueError("voc_set needs class names: set class_names or predict with a model that has them")
        return [voc_result_file(self.output_dir / "results", self.voc_set, name) for name in names[1:]]

    def planned_files(self, trainer: Trainer, sources: list[Source]) -> list[Path]:
        names = class_names_of(trainer, self.class_names)
        files = [self.output_dir / "detections.json", self.output_dir / "coco_results.json", *self._voc_files(names)]
        if self.draw:
            files += [self.output_dir / "boxes" / f"{source.name}.png" for source in sources]
        return files

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: list[Detection],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        names = class_names_of(trainer, self.class_names)
        records = []
        indices, sources = self.batch_samples(trainer, batch, batch_indices, dataloader_idx, len(prediction))
        for source, detection in zip(sources, prediction):
            record = {key: detection[key].detach().cpu() for key in ("boxes", "scores", "labels")}
            records.append(record)
            if self.draw:
                keep = record["scores"] >= self.score_threshold
                labels = record["labels"][keep].tolist()
                texts = [f"{_name(names, i)} {s:.2f}" for i, s in zip(labels, record["scores"][keep].tolist())]
                drawn = draw_detections(
                    read_rgb(source.file), record["boxes"][keep], texts, [label_color(i) for i in labels]
                )
                path = self.output_dir / "boxes" / f"{source.name}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                write_png(drawn, str(path))
        self.collect(indices, dataloader_idx, records)

    def write_collected(self, trainer: Trainer, records: list[tuple[Source, Any]]) -> None:
        names = class_names_of(trainer, self.class_names)
        category_ids = getattr(trainer.lightning_module, "category_ids", None)  # the data's ids (COCO)
        summary, coco = [], []
        for source, det in records:
            keep = det["scores"] >= self.score_threshold
            labels = det["labels"][keep].tolist()
            summary.append(
                {
                    "file": f"{source.name}{source.file.suffix}",
                    "boxes": [[round(v, 2) for v in box] for box in det["boxes"][keep].tolist()],
                    "scores": [round(s, 4) for s in det["scores"][keep].tolist()],
                    "labels": labels,
                    "class_names": [_name(names, i) for i in labels],
                }
            )
            coco += coco_results(str(source.name), det["boxes"], det["scores"], det["labels"], category_ids)
        write_json(self.output_dir / "detections.json", summary)
        write_json(self.output_dir / "coco_results.json", coco)
        for label, path in enumerate(self._voc_files(names), start=1):
            path.parent.mkdir(parents=True, exist_ok=True)
            lines = [
                line
                for source, det in records
                for line in voc_lines(str(source.name), det["boxes"], det["scores"], det["labels"], label)
            ]
            path.write_text("".join(f"{line}\n" for line in lines))


def _name(names: Sequence[str] | None, label: int) -> str:
    return names[label] if names is not None and label < len(names) else str(label)
