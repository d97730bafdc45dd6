"""Classifier builders: any torchvision classification model, or any timm model (``timm:<name>``)."""

import timm
import torchvision
from torch import nn

from refvision.models.weights import HF_CACHE, explain_download_failure

TIMM_PREFIX = "timm:"


def available_classifiers() -> list[str]:
    """Names accepted by :func:`build_classifier` (torchvision's; timm ones are ``timm:<name>``)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_classifier(name: str, num_classes: int, weights: str | None = None) -> nn.Module:
    """Build classifier ``name`` with a ``num_classes``-way head.

    Args:
        name: a torchvision classification model (``mobilenet_v2``, ``resnet18``...) or
            ``timm:<model>`` for any timm model.
        num_classes: size of the classification head. With pretrained weights whose head has a
            different size, the head is replaced by a freshly initialized ``nn.Linear``.
        weights: torchvision weight name (``DEFAULT``, ``IMAGENET1K_V1``...) or, for timm,
            a pretrained tag (``DEFAULT`` for timm's default, else e.g. ``a1_in1k``).
            ``None`` builds with random initialization and downloads nothing.

    Raises:
        ValueError: unknown model or weight name (the message lists where to find valid ones).
        WeightsUnavailableError: the weights could not be downloaded.
    """
    if name.startswith(TIMM_PREFIX):
        return _build_timm(name[len(TIMM_PREFIX) :], num_classes, weights)
    if name not in available_classifiers():
        raise ValueError(
            f"model.backbone={name!r} is not a torchvision classification model nor 'timm:<name>'; "
            f"torchvision offers: {', '.join(available_classifiers())}"
        )
    if weights is None:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    try:
        enum = torchvision.models.get_model_weights(name)
        weight = enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    except KeyError:
        raise ValueError(
            f"model.weights={weights!r} is not a weight of {name}; allowed: {', '.join(['DEFAULT', *enum.__members__])}"
        ) from None
    with explain_download_failure(f"torchvision weights {name}.{weight.name}", "model.weights"):
        model = torchvision.models.get_model(name, weights=weight)
    if len(weight.meta["categories"]) != num_classes:
        _replace_head(model, num_classes)
    return model


def _build_timm(name: str, num_classes: int, weights: str | None) -> nn.Module:
    if not timm.is_model(name):
        raise ValueError(f"model.backbone='timm:{name}' is not a timm model; see timm.list_models()")
    if weights is None:
        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    full_name = name if weights == "DEFAULT" else f"{name}.{weights}"
    with explain_download_failure(f"timm weights {full_name}", "model.weights", HF_CACHE):
        return timm.create_model(full_name, pretrained=True, num_classes=num_classes)


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the last ``nn.Linear`` of ``model`` for a new ``in_features -> num_classes`` layer."""
    parent_name, linear = None, None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            parent_name, linear = module_name, module
    if linear is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head to resize to {num_classes} classes")
    parent_path, _, attr = parent_name.rpartition(".")
    parent = model.get_submodule(parent_path)
    setattr(parent, attr, nn.Linear(linear.in_features, num_classes, bias=linear.bias is not None))
