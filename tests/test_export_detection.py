"""`refvision export --postprocess true`: SSD box decoding and NMS inside the ONNX graph.

The references are torchvision's: ``batched_nms`` for the NMS operator, and the detector in eval
mode (``model([image])``, its own transform, decoding, per-class NMS and box rescaling) for the
exported graph, on a real photograph (matplotlib's bundled ``grace_hopper.jpg``, 600 x 512) cut and
scaled to several sizes. The detector is seeded rather than trained: batch-norm statistics of crops
of the photo, and a class head whose background bias leaves a few dozen boxes per image above
the 0.01 score threshold, so that the threshold, the top-k, NMS and the ordering all have work.
"""

from collections.abc import Iterator
from pathlib import Path

import matplotlib.cbook
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.ops import batched_nms

from refvision.app.cli import main
from refvision.checkpoints.deploy import load_task_checkpoint
from refvision.export.nms import multiclass_nms, onnx_translations
from refvision.export.ssd import detection_gaps
from refvision.tasks.detection import DetectionTask

SIZE = 128
SCORE_TOLERANCE = 1e-4
"""Scores closer than this may come in either order; the exported ones may differ from PyTorch's by this much."""


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _photo() -> Tensor:
    """``(3, 600, 512)`` float RGB in [0, 1]: a photograph."""
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


def _random_boxes(generator: torch.Generator, shape: tuple[int, ...]) -> Tensor:
    centers = torch.rand(*shape, 2, generator=generator) * 100
    sizes = torch.rand(*shape, 2, generator=generator) * 40 + 10
    return torch.cat([centers - sizes / 2, centers + sizes / 2], -1)


def test_multiclass_nms_is_torchvision_batched_nms_in_pytorch_and_onnxruntime(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    batch, classes, boxes_per_image = 2, 3, 80
    boxes = _random_boxes(generator, (batch, boxes_per_image))
    scores = torch.rand(batch, classes, boxes_per_image, generator=generator)
    threshold, iou = 0.3, 0.45

    expected = torch.zeros(batch, classes, boxes_per_image)
    for image in range(batch):
        label, index = torch.where(scores[image] > threshold)
        keep = batched_nms(boxes[image, index], scores[image, label, index], label, iou)
        expected[image, label[keep], index[keep]] = 1.0
    assert 0 < expected.sum() < (scores > threshold).sum(), "NMS must suppress some boxes and keep some"
    torch.testing.assert_close(multiclass_nms(boxes, scores, iou, threshold, boxes_per_image), expected)

    class Keep(nn.Module):
        def forward(self, boxes: Tensor, scores: Tensor) -> Tensor:
            return multiclass_nms(boxes, scores, iou, threshold, boxes_per_image)

    path = tmp_path / "nms.onnx"
    torch.onnx.export(
        Keep().eval(), (boxes, scores), path, dynamo=True, custom_translation_table=onnx_translations(), verbose=False
    )
    assert "NonMaxSuppression" in {node.op_type for node in onnx.load(str(path)).graph.node}
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, dict(zip([i.name for i in session.get_inputs()], [boxes.numpy(), scores.numpy()])))
    torch.testing.assert_close(torch.from_numpy(got), expected)


def test_detection_gaps_match_detections_not_rows() -> None:
    boxes = torch.tensor([[[0.0, 0, 10, 10], [5, 5, 20, 20], [0, 0, 0, 0]]])
    scores, labels, counts = torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[1, 2, 0]]), torch.tensor([2])
    expected = [boxes, scores, labels, counts]
    swapped = [boxes[:, [1, 0, 2]], scores[:, [1, 0, 2]], labels[:, [1, 0, 2]], counts]
    assert detection_gaps(expected, swapped) == [0.0, 0.0, 0.0, 0.0]
    moved = [boxes + torch.tensor([0.5, 0, 0, 0]) * (labels > 0)[..., None], scores, labels, counts]
    assert detection_gaps(expected, moved)[0] == 0.5
    relabelled = [boxes, scores, torch.tensor([[1, 3, 0]]), counts]
    assert detection_gaps(expected, relabelled)[2] == float("inf")
    assert detection_gaps(expected, [boxes, scores, labels, torch.tensor([1])])[3] == 1.0


def _seeded_detector(path: Path) -> str:
    """A train-form SSDLite checkpoint (RefConv in its first blocks) whose scores clear the threshold on the photo."""
    torch.manual_seed(0)
    task = DetectionTask(
        detector="ssdlite320_mobilenet_v2",
        num_classes=4,
        image_size=SIZE,
        class_names=["background", "face", "tie", "medal"],
        conv={"kind": "refconv", "include": ["backbone.features.0.[0-3].*"]},
    )
    photo = _photo()
    crops = torch.stack([photo[:, y : y + 400, x : x + 400] for y, x in [(0, 0), (100, 50), (200, 100), (150, 0)]])
    with torch.no_grad():
        for name, param in task.named_parameters():
            if "refocus_weight" in name:
                param.normal_(0, 0.05)
        for module in task.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = None  # one forward pass sets the statistics of that batch
        task.train()
        x = F.interpolate((crops - 0.5) / 0.5, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        task.model.head(list(task.model.backbone(x).values()))
        for block in task.model.head.classification_head.module_list:
            block[-1].weight.normal_(0, 0.05)
            block[-1].bias.zero_()
            block[-1].bias[0 :: task.num_classes] = 7.0  # the background logit of every anchor
    class_path = f"{type(task).__module__}.{type(task).__qualname__}"
    torch.save(
        {
            "state_dict": task.state_dict(),
            "hyper_parameters": {**dict(task.hparams), "_class_path": class_path},
            "refvision": {"task": class_path, "form": "train"},
        },
        path,
    )
    return str(path)


def _assert_same_detections(
    got: list[np.ndarray], row: int, expected: dict[str, Tensor], size: tuple[int, int]
) -> None:
    """Row ``row`` of the exported outputs holds ``expected``'s detections: same count, labels, boxes within
    1e-4 of the image size, scores within :data:`SCORE_TOLERANCE`, in the same order but for near-tied scores."""
    boxes, scores, labels, counts = (torch.as_tensor(a[row]) for a in got)
    count = len(expected["scores"])
    assert int(counts) == count > 0
    box_tolerance = 1e-4 * max(size)
    order = []
    for box, label in zip(expected["boxes"], expected["labels"]):
        close = ((boxes[:count] - box).abs().amax(1) <= box_tolerance) & (labels[:count] == label)
        assert int(close.sum()) == 1, f"detection {box.tolist()} (label {int(label)}) is not exported once"
        order.append(int(close.nonzero()))
    ranked = expected["scores"]
    assert all(i == j or abs(ranked[i] - ranked[j]) <= SCORE_TOLERANCE for j, i in enumerate(order))
    torch.testing.assert_close(boxes[order], expected["boxes"], rtol=0, atol=box_tolerance)
    torch.testing.assert_close(scores[order], expected["scores"], rtol=0, atol=SCORE_TOLERANCE)
    assert not boxes[count:].any() and not scores[count:].any() and not labels[count:].any()


@pytest.mark.slow
def test_postprocess_onnx_gives_torchvision_detections_on_photos(tmp_path: Path) -> None:
    ckpt = _seeded_detector(tmp_path / "detector.ckpt")
    out = tmp_path / "detector.onnx"
    main(["export", "--ckpt", ckpt, "--output", str(out), "--format", "onnx", "--postprocess", "true"])
    reference, _ = load_task_checkpoint(ckpt)  # train form, eval mode
    ssd = reference.model

    model = onnx.load(str(out))
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.output}
    assert dims == {
        "boxes": ["batch", 200, 4],
        "scores": ["batch", 200],
        "labels": ["batch", 200],
        "num_detections": ["batch"],
    }
    props = {entry.key: entry.value for entry in model.metadata_props}
    assert props["task"] == "detection" and props["postprocess"] == "true"
    assert float(props["score_threshold"]) == ssd.score_thresh and float(props["nms_threshold"]) == ssd.nms_thresh
    assert int(props["detections_per_image"]) == ssd.detections_per_img == 200
    assert int(props["candidates_per_class"]) == ssd.topk_candidates
    assert props["class_names"] == '["background", "face", "tie", "medal"]'
    assert props["mean"] == props["std"] == "[0.5, 0.5, 0.5]"  # SSDLite's own, applied inside
    assert props["input_size"] == f"[{SIZE}, {SIZE}]"
    assert props["dynamic_axes"] == (
        '{"images": {"0": "batch", "2": "height", "3": "width"}, "boxes": {"0": "batch"}, '
        '"scores": {"0": "batch"}, "labels": {"0": "batch"}, "num_detections": {"0": "batch"}}'
    )

    photo = _photo()
    batches = [
        [photo],  # 600 x 512
        [photo[:, 100:400, 30:480]],  # 300 x 450
        [F.interpolate(photo[None], size=(150, 211), mode="bilinear", antialias=True)[0]],
        [photo[:, :384], photo[:, 216:]],  # a batch of two 384 x 512 images
    ]
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    suppressed = False
    for images in batches:
        got = session.run(None, {"images": torch.stack(images).numpy()})
        with torch.no_grad():
            expected = ssd(images)
            ssd.nms_thresh, nms = 1.0, ssd.nms_thresh
            unsuppressed = ssd(images)
            ssd.nms_thresh = nms
        for row, (image, detections) in enumerate(zip(images, expected)):
            _assert_same_detections(got, row, detections, tuple(image.shape[1:]))
        suppressed |= any(len(a["scores"]) > len(b["scores"]) for a, b in zip(unsuppressed, expected))
    assert suppressed, "NMS must have had boxes to suppress"
