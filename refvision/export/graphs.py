"""What a task's export holds: the module, its input, which dims may vary, its outputs and their layout.

Every graph of the three tasks takes one input, ``images`` ``(batch, 3, height, width)`` float32 RGB
in [0, 1], and normalises it inside. The batch is dynamic; height and width are asked dynamic
where the function allows any size:

- classification: the classifier (torchvision's global pooling takes any size; a model whose
  export fixes the size, a ViT's position embedding for one, keeps the size it was exported at);
- segmentation with ``inference: whole``: the image padded to a multiple of 16, the network,
  the logits cropped back (what ``refvision test`` runs). With ``inference: slide`` the graph is
  the network on one window, fixed at ``slide_crop``; the windows are the caller's to lay out;
- detection: the SSD resizes any input to its fixed size inside; with ``postprocess`` the graph
  ends in box decoding and NMS and gives final, padded detections (:class:`BatchSSDDetections`).

Another task's graph is its ``profile_module()`` on its ``example_inputs()``, with a dynamic batch
when that example is one tensor.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from refvision.export.ssd import BatchSSDDetections, BatchSSDRaw, detection_gaps
from refvision.models.segmentation_inference import whole_inference
from refvision.tasks.base import RefvisionTask
from refvision.tasks.classification import ClassificationTask
from refvision.tasks.detection import DetectionTask
from refvision.tasks.segmentation import SegmentationTask

INPUT_NAME = "images"
BATCH, HEIGHT, WIDTH = "batch", "height", "width"
IMAGE_AXES = {0: BATCH, 2: HEIGHT, 3: WIDTH}
"""The named dims of an ``images`` input ``(batch, 3, height, width)``."""
IMAGE_INPUT = "images: (batch, 3, height, width) float32 RGB in [0, 1]; the graph normalises it with mean / std"


@dataclasses.dataclass(frozen=True)
class ExportGraph:
    """One task's export, before any exporter runs.

    ``inputs`` is the export input: ``(batch_size, 3, H, W)`` for the tasks above, else the task's
    example. ``dynamic_batch`` / ``dynamic_size``: the exporter is asked for a dynamic batch / a
    dynamic height and width. ``other_size``: another ``(H, W)`` the check also runs the file at
    when height and width came out dynamic. ``output_axes``: the dims of each output that follow
    the input's (by name, e.g. ``{0: "batch"}``). ``outputs`` says what each output holds, and
    ``facts`` what the file's metadata says about the task besides; both go into the metadata.
    ``compare`` gives the largest difference in each output between PyTorch's outputs and the
    file's (default: element by element).
    """

    module: nn.Module
    inputs: Any
    dynamic_batch: bool
    dynamic_size: bool
    other_size: tuple[int, int] | None
    output_names: tuple[str, ...]
    output_axes: dict[str, dict[int, str]]
    outputs: dict[str, str]
    facts: dict[str, Any]
    compare: Callable[[list[Tensor], list[Tensor]], list[float]] | None = None


class WholeImageSegmenter(nn.Module):
    """``(B, 3, H, W)`` in [0, 1] -> logits ``(B, C, H, W)``: normalised, padded to multiples of 16, cropped back."""

    def __init__(self, normalize: nn.Module, model: nn.Module) -> None:
        super().__init__()
        self.normalize, self.model = normalize, model

    def forward(self, images: Tensor) -> Tensor:
        return whole_inference(self.model, self.normalize(images))


def export_graph(task: RefvisionTask, postprocess: bool, batch_size: int) -> ExportGraph:
    """The graph of ``task`` (in eval mode, deploy form) to export, on ``batch_size`` images.

    Raises:
        ValueError: ``postprocess`` for a task other than detection.
    """
    if isinstance(task, DetectionTask):
        return _detection(task, postprocess, batch_size)
    if postprocess:
        raise ValueError(
            f"--postprocess true: only detection checkpoints have post-processing (box decoding, NMS); "
            f"this one is {type(task).__name__}'s; expected --postprocess false"
        )
    if isinstance(task, SegmentationTask):
        return _segmentation(task, batch_size)
    if isinstance(task, ClassificationTask):
        return _classification(task, batch_size)
    return _generic(task, batch_size)


def _images(batch_size: int, size: tuple[int, int]) -> Tensor:
    return torch.rand(batch_size, 3, *size)


def _data_facts(task: RefvisionTask, input_size: tuple[int, int]) -> dict[str, Any]:
    return {
        "input": IMAGE_INPUT,
        "num_classes": task.num_classes,
        "class_names": task.class_names,
        "mean": list(task.mean) if task.mean is not None else None,
        "std": list(task.std) if task.std is not None else None,
        "input_size": list(input_size),
    }


def _classification(task: ClassificationTask, batch_size: int) -> ExportGraph:
    size = (task.image_size, task.image_size)
    return ExportGraph(
        module=task.profile_module(),
        inputs=_images(batch_size, size),
        dynamic_batch=True,
        dynamic_size=True,
        other_size=(size[0] + size[0] // 2 + 1, size[1] + 3),
        output_names=("output",),
        output_axes={"output": {0: BATCH}},
        outputs={"output": "(batch, num_classes) float32 class logits (no softmax)"},
        facts=_data_facts(task, size),
    )


def _segmentation(task: SegmentationTask, batch_size: int) -> ExportGraph:
    whole = task.inference == "whole"
    size = tuple(task.example_size) if whole else tuple(task.slide_crop)
    facts = {**_data_facts(task, size), "palette": task.palette.tolist(), "inference": task.inference}
    if not whole:
        facts |= {"slide_crop": list(task.slide_crop), "slide_stride": list(task.slide_stride)}
    return ExportGraph(
        module=WholeImageSegmenter(task.normalize, task.model),
        inputs=_images(batch_size, size),
        dynamic_batch=True,
        dynamic_size=whole,
        other_size=(size[0] + size[0] // 2 + 1, size[1] + 3) if whole else None,
        output_names=("output",),
        output_axes={"output": IMAGE_AXES},
        outputs={"output": "(batch, num_classes, height, width) float32 class logits at the input size"},
        facts=facts,
    )


def _detection(task: DetectionTask, postprocess: bool, batch_size: int) -> ExportGraph:
    ssd = task.model
    module = BatchSSDDetections(ssd) if postprocess else BatchSSDRaw(ssd)
    size = module.size
    facts = {
        **_data_facts(task, size),
        # What the graph applies: the checkpoint's values or, where it states none, the detector's own.
        "mean": list(ssd.transform.image_mean),
        "std": list(ssd.transform.image_std),
        "detector": task.detector,
        "postprocess": postprocess,
    }
    if postprocess:
        facts |= {
            "score_threshold": ssd.score_thresh,
            "nms_threshold": ssd.nms_thresh,
            "candidates_per_class": ssd.topk_candidates,
            "detections_per_image": ssd.detections_per_img,
        }
        names = ("boxes", "scores", "labels", "num_detections")
        outputs = {
            "boxes": "(batch, max_detections, 4) float32 xyxy boxes in input pixels, best first",
            "scores": "(batch, max_detections) float32 class probabilities, decreasing",
            "labels": "(batch, max_detections) int64 labels in 1..num_classes-1 (class_names[label])",
            "num_detections": "(batch,) int64: image i's detections are its first num_detections[i] rows; "
            "the rest are zeros",
        }
    else:
        names = ("output",)
        outputs = {
            "output": "(batch, anchors * (4 + num_classes)) float32: the box regression (anchors, 4) then the "
            "class logits (anchors, num_classes) of each image, flattened; no anchor decoding, threshold or NMS"
        }
    return ExportGraph(
        module=module,
        inputs=_images(batch_size, size),
        dynamic_batch=True,
        dynamic_size=True,
        # Twice the height, the same width: resizing to the model size is then exact in every runtime.
        other_size=(2 * size[0], size[1]),
        output_names=names,
        output_axes={name: {0: BATCH} for name in names},
        outputs=outputs,
        facts=facts,
        compare=detection_gaps if postprocess else None,
    )


def _generic(task: RefvisionTask, batch_size: int) -> ExportGraph:
    example = task.example_inputs()
    batched = isinstance(example, Tensor)
    inputs = torch.cat([example, *(task.example_inputs() for _ in range(batch_size - 1))]) if batched else example
    return ExportGraph(
        module=task.profile_module(),
        inputs=inputs,
        dynamic_batch=batched,
        dynamic_size=False,
        other_size=None,
        output_names=(),
        output_axes={},
        outputs={},
        facts={"num_classes": task.num_classes, "class_names": task.class_names},
    )
