"""Python inference with any refvision checkpoint: a :class:`Predictor` called on images, typed results.

Like MMDetection's ``DetInferencer`` or a timm model with its transforms: one object from a checkpoint
(training or deploy form, local file or URL, read weights-only), called on file paths, PIL images,
``(H, W, 3)`` uint8 numpy arrays or ``(3, H, W)`` tensors, one or a list, in batches, on a device. It
preprocesses and runs the model as ``refvision predict`` does, so both give the same numbers.

Classification::

    from refvision.inference import Predictor

    predictor = Predictor.from_checkpoint("classifier.ckpt")  # a file or an https:// URL; device="cuda"
    print(predictor.preprocessing)  # resize, crop, interpolation, mean / std: the checkpoint's
    result = predictor("photo.jpg")  # or a PIL image, an (H, W, 3) uint8 array, a (3, H, W) tensor
    for label, name, prob in result.top_k:  # the 5 most probable classes
        print(f"{name} ({label}): {prob:.3f}")

Detection::

    from refvision.inference import Predictor

    predictor = Predictor.from_checkpoint("detector.ckpt", score_threshold=0.5, batch_size=16)
    for result in predictor(["street.png", "photo.jpg"]):  # a list in, a list of results out
        for box, score, name in zip(result.boxes.tolist(), result.scores.tolist(), result.class_names):
            print(f"{name} {score:.2f} {[round(v) for v in box]}")  # xyxy, the original image's pixels

Segmentation::

    import numpy as np
    from PIL import Image

    from refvision.inference import Predictor

    predictor = Predictor.from_checkpoint("segmenter.ckpt", options={"inference": "slide", "flip": True})
    result = predictor(np.asarray(Image.open("street.png").convert("RGB")))
    print(tuple(result.mask.shape), [result.class_names[c] for c in result.mask.unique().tolist()])
    Image.fromarray(result.color_image().permute(1, 2, 0).numpy()).save("street_classes.png")
"""

from refvision.inference.inputs import ImageInput
from refvision.inference.predictor import Predictor, Preprocessing
from refvision.inference.results import ClassificationResult, ClassScore, DetectionResult, SegmentationResult

__all__ = [
    "ClassScore",
    "ClassificationResult",
    "DetectionResult",
    "ImageInput",
    "Predictor",
    "Preprocessing",
    "SegmentationResult",
]
