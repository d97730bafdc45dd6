"""Which parameters train: the three regimes of the refocus workflow.

- ``all``: every parameter (baselines, the continued-baseline control, DRConv fine-tuning).
  RefConv bases are frozen buffers by construction and never train.
- ``all_but_basis``: everything except the converted convs' pretrained kernels (``weight`` of
  every :class:`~refvision.nn.ConvMethod`) -- what RefConv's public code trains.
- ``refocus_only``: only the parameters the method adds (``ConvMethod.method_parameters``:
  RefConv's refocusing weights, DRConv's guide and filter generator) -- what the RefConv paper
  describes. Normalization layers then also
  keep their running statistics (see :func:`freeze_norm_statistics`).
"""

from typing import Literal, get_args

from torch import nn

from refvision.nn import ConvMethod

TrainableMode = Literal["all", "all_but_basis", "refocus_only"]
TRAINABLE_MODES: tuple[str, ...] = get_args(TrainableMode)


def set_trainable(model: nn.Module, mode: str) -> None:
    """Set ``requires_grad`` on every parameter of ``model`` according to ``mode``.

    Raises:
        ValueError: unknown ``mode``, or ``refocus_only`` on a model with no RefConv/DRConv.
    """
    if mode not in TRAINABLE_MODES:
        raise ValueError(f"model.trainable={mode!r}; allowed: {', '.join(TRAINABLE_MODES)}")
    model.requires_grad_(mode != "refocus_only")
    converted = [m for m in model.modules() if isinstance(m, ConvMethod)]
    if mode == "refocus_only":
        if not converted:
            raise ValueError("model.trainable='refocus_only' needs converted convs (model.conv.kind other than none)")
        for module in converted:
            for _, param in module.method_parameters():
                param.requires_grad_(True)
    elif mode == "all_but_basis":
        for module in converted:
            if isinstance(module.weight, nn.Parameter):
                module.weight.requires_grad_(False)


def freeze_norm_statistics(model: nn.Module) -> None:
    """Put every batch-norm layer of ``model`` in eval mode so running statistics stay fixed."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
