"""The predictor: one object built from a refvision checkpoint, called on images, giving typed results.

It preprocesses as ``refvision predict`` does (:func:`refvision.data.predict.predict_transform` and
``predict_collate``, the functions :class:`~refvision.data.predict.PredictImagesDataModule` is built from)
and runs the task's own ``predict_step``, the model step of ``refvision predict``; so for the same image,
checkpoint and settings the results equal what the prediction writers write.
"""

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch
from lightning import LightningDataModule
from lightning.fabric.utilities.apply_func import move_data_to_device
from torchvision.transforms import v2

from refvision.checkpoints.deploy import task_from_checkpoint
from refvision.checkpoints.loading import read_checkpoint, resolve_source, task_of
from refvision.data.predict import Preset, predict_collate, predict_transform
from refvision.inference.inputs import ImageInput, as_image
from refvision.inference.results import (
    ClassificationResult,
    DetectionResult,
    SegmentationResult,
    classification_results,
    detection_results,
    segmentation_results,
)
from refvision.tasks.base import RefvisionTask
from refvision.tasks.classification import ClassificationTask
from refvision.tasks.detection import DetectionTask
from refvision.tasks.options import Role
from refvision.tasks.segmentation import SegmentationTask
from refvision.utils.class_path import import_class

logger = logging.getLogger("refvision")

Result = ClassificationResult | DetectionResult | SegmentationResult

PRESETS: dict[type[RefvisionTask], Preset] = {
    ClassificationTask: "classification",
    DetectionTask: "detection",
    SegmentationTask: "segmentation",
}
"""The ``refvision predict`` preset of each task: its preprocessing, and the kind of its results."""

CHECKPOINT = "checkpoint"
"""How errors about the checkpoint file call it."""


@dataclass(frozen=True)
class Preprocessing:
    """What happens to an image before the network (timm's ``resolve_data_config``, for refvision).

    ``transforms`` (the predictor's) take the decoded ``uint8`` image to ``float32`` RGB in [0, 1]:
    classification resizes its shorter side to ``resize_size`` (``interpolation``) and center-crops
    ``image_size``; detection and segmentation keep the image's size. The network then normalises
    with ``mean`` / ``std`` inside (None: it takes [0, 1] as it is); the detector also resizes to its
    ``image_size`` ``(H, W)`` inside, and maps its boxes back to the image.
    """

    preset: Preset
    image_size: int | tuple[int, int] | None
    resize_size: int | None
    interpolation: str | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None


class Predictor:
    """Predict with ``task`` (a trained refvision task; the predictor puts it in eval mode on ``device``).

    ``predictor(images)`` takes one image or a list (see :mod:`refvision.inference.inputs` for the kinds),
    runs them ``batch_size`` at a time and returns a result per image (a list for a list): a
    :class:`ClassificationResult`, :class:`DetectionResult` (detections with ``score >= score_threshold``)
    or :class:`SegmentationResult`. Classification preprocessing resizes to ``resize_size`` (None:
    ``image_size * 256 // 224``, torchvision's reference ratio) with ``interpolation`` and crops the task's
    ``image_size``; :attr:`preprocessing` says all of it and :attr:`transforms` does it.

    Raises:
        TypeError: ``task`` is not a classification, detection or segmentation task.
        ValueError: a ``batch_size`` below 1, a ``score_threshold`` outside [0, 1], a ``resize_size``
            below the crop, an unknown ``interpolation``.
    """

    def __init__(
        self,
        task: RefvisionTask,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        score_threshold: float = 0.3,
        resize_size: int | None = None,
        interpolation: str = "bilinear",
    ) -> None:
        preset = next((p for cls, p in PRESETS.items() if isinstance(task, cls)), None)
        if preset is None:
            raise TypeError(
                f"Predictor: task {type(task).__qualname__}; expected a {', '.join(c.__name__ for c in PRESETS)}"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Predictor: batch_size={batch_size!r}; expected an integer >= 1")
        if not 0 <= score_threshold <= 1:
            raise ValueError(f"Predictor: score_threshold={score_threshold!r}; expected a score in [0, 1]")
        self.preprocessing = _preprocessing(task, preset, resize_size, interpolation)
        p = self.preprocessing
        if preset == "classification" and p.resize_size < p.image_size:
            raise ValueError(
                f"Predictor: resize_size={p.resize_size} is below the model's image_size={p.image_size}; "
                "expected at least the crop"
            )
        modes = [mode.value for mode in v2.InterpolationMode]
        if interpolation not in modes:
            raise ValueError(f"Predictor: interpolation={interpolation!r}; expected one of {', '.join(modes)}")
        self.transforms: v2.Transform = predict_transform(preset, p.image_size, p.resize_size, p.interpolation)
        self._collate = predict_collate(preset)
        self.device = torch.device(device)
        self.task = task.eval().to(self.device)
        self.task.apply_speed_options()
        self.batch_size, self.score_threshold = batch_size, score_threshold

    @classmethod
    def from_checkpoint(
        cls,
        source: str | os.PathLike,
        device: str | torch.device = "cpu",
        *,
        batch_size: int = 8,
        score_threshold: float = 0.3,
        resize_size: int | None = None,
        interpolation: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> "Predictor":
        """The predictor of a refvision checkpoint, training or deploy form, of any task.

        ``source`` is a local file or an ``http(s)://`` URL (downloaded once into the torch hub cache and
        checked before reuse, as ``--ckpt_path`` is); the file is read weights-only, nothing in it runs.
        The checkpoint gives the network, its class names, ``mean`` / ``std`` and input size. A checkpoint
        of ``refvision fit`` also records its data module's ``resize_size`` / ``interpolation``, which
        classification uses unless given here; where it does not (a checkpoint saved outside a fit), the default
        resize is used and a warning says so. ``options`` replace the task's options of how it runs
        (:attr:`Role.RUN <refvision.tasks.options.Role.RUN>`: ``inference``, ``slide_crop``, ``flip``,
        ``scales``, ``channels_last``, ...), which otherwise are the checkpoint's (``refvision predict``
        takes them from its config). The other arguments are :class:`Predictor`'s.

        Raises:
            CheckpointError: the file is not a refvision task checkpoint it can read and rebuild
                (see :func:`refvision.checkpoints.deploy.load_task_checkpoint`), naming it.
            FileNotFoundError: no such file.
            ValueError: an ``options`` key that is not such an option of the task, or a value it refuses.
        """
        checkpoint = read_checkpoint(resolve_source(source, CHECKPOINT), CHECKPOINT, source=str(source))
        if options:
            checkpoint = _with_run_options(checkpoint, source, dict(options))
        task, _ = task_from_checkpoint(checkpoint, source, CHECKPOINT)
        data = checkpoint.get(LightningDataModule.CHECKPOINT_HYPER_PARAMS_KEY)
        data = data if isinstance(data, Mapping) else {}
        if isinstance(task, ClassificationTask):
            if resize_size is None and isinstance(data.get("resize_size"), int):
                resize_size = data["resize_size"]
            elif resize_size is None:
                logger.warning(
                    "%s %s does not record the resize size of its training data (a deploy checkpoint?); resizing "
                    "the shorter side to %d (image_size %d x 256 / 224), pass resize_size to choose",
                    CHECKPOINT,
                    source,
                    task.image_size * 256 // 224,
                    task.image_size,
                )
            if interpolation is None and isinstance(data.get("interpolation"), str):
                interpolation = data["interpolation"]
        return cls(
            task,
            device=device,
            batch_size=batch_size,
            score_threshold=score_threshold,
            resize_size=resize_size,
            interpolation=interpolation or "bilinear",
        )

    @property
    def class_names(self) -> tuple[str, ...]:
        """The name of every class of the model, by label (detection: background first); numbers where
        the checkpoint has no names."""
        names = self.task.class_names
        return tuple(names) if names is not None else tuple(str(i) for i in range(self.task.num_classes))

    @overload
    def __call__(self, images: ImageInput) -> Result: ...

    @overload
    def __call__(self, images: Sequence[ImageInput]) -> list[Result]: ...

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> Result | list[Result]:
        """The result of one image, or the list of results of a list (or tuple) of images, in order.

        Raises (naming the image, ``image`` or ``images[i]``, and what was expected): ``TypeError`` for
        an object of another kind, ``ValueError`` for an array or tensor of another shape or dtype or an
        undecodable file, ``FileNotFoundError`` for a missing one (see :func:`as_image`).
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        results: list[Result] = []
        for start in range(0, len(items), self.batch_size):
            samples = [
                (self.transforms(as_image(item, "image" if single else f"images[{start + i}]")), {"index": start + i})
                for i, item in enumerate(items[start : start + self.batch_size])
            ]
            results += self._predict_batch(self._collate(samples))
        return results[0] if single else results

    def _predict_batch(self, batch: Any) -> list[Result]:
        """The model step of ``refvision predict`` on one collated batch: to the device, the task's
        ``on_after_batch_transfer`` and ``predict_step`` in inference mode, as Lightning's predict loop."""
        batch = self.task.on_after_batch_transfer(move_data_to_device(batch, self.device), 0)
        with torch.inference_mode():
            outputs = self.task.predict_step(batch, 0)
        if isinstance(self.task, ClassificationTask):
            return classification_results(outputs, self.class_names)
        if isinstance(self.task, DetectionTask):
            return detection_results(outputs, self.class_names, self.score_threshold)
        return segmentation_results(outputs, self.class_names, self.task.palette)


def _preprocessing(task: RefvisionTask, preset: Preset, resize_size: int | None, interpolation: str) -> Preprocessing:
    if isinstance(task, ClassificationTask):
        size = task.image_size
        return Preprocessing(
            preset, size, size * 256 // 224 if resize_size is None else resize_size, interpolation, task.mean, task.std
        )
    if isinstance(task, DetectionTask):
        transform = task.model.transform
        height, width = transform.fixed_size
        return Preprocessing(
            preset, (height, width), None, None, tuple(transform.image_mean), tuple(transform.image_std)
        )
    return Preprocessing(preset, None, None, None, task.mean, task.std)


def _with_run_options(checkpoint: Any, source: str | os.PathLike, options: dict[str, Any]) -> Any:
    """``checkpoint`` with ``options`` in its hyper-parameters, once each is known to be an option of how
    its task runs. A checkpoint whose task cannot be told is returned as it is, for
    :func:`task_from_checkpoint` to refuse."""
    try:
        task_cls = import_class(task_of(checkpoint) or "")
    except (ImportError, AttributeError, ValueError):
        return checkpoint
    if not (isinstance(task_cls, type) and issubclass(task_cls, RefvisionTask)):
        return checkpoint
    allowed = task_cls.options(Role.RUN)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"Predictor options {', '.join(map(repr, unknown))}: not options of how {task_cls.__name__} runs; "
            f"expected some of {', '.join(allowed)} ({CHECKPOINT} {source})"
        )
    hparams = checkpoint.get("hyper_parameters")
    return {**checkpoint, "hyper_parameters": {**(hparams if isinstance(hparams, dict) else {}), **options}}
