"""Pretrained weights: named ones fetched by torchvision/timm/smp (with an offline failure that says
what to do), and the formats of checkpoints written by other libraries (``init_from``)."""

import contextlib
import urllib.error
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn
from torchvision.models import ResNet


class WeightsUnavailableError(RuntimeError):
    """A named pretrained weight could not be downloaded (no network, or the name is wrong)."""


_NETWORK_ERRORS: tuple[type[BaseException], ...] = (urllib.error.URLError, ConnectionError, TimeoutError)
try:  # huggingface_hub backs timm and smp downloads; it raises its own error types when offline.
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    _NETWORK_ERRORS += (HfHubHTTPError, LocalEntryNotFoundError)
except ImportError:  # pragma: no cover - huggingface_hub comes with timm
    pass


TORCH_HUB_CACHE = (
    "the torch hub cache ($TORCH_HOME/hub/checkpoints/, default ~/.cache/torch/hub/checkpoints/) "
    "under its original file name"
)
HF_CACHE = "the Hugging Face cache ($HF_HOME/hub, default ~/.cache/huggingface/hub) and set HF_HUB_OFFLINE=1"


@contextlib.contextmanager
def explain_download_failure(what: str, option: str, cache: str = TORCH_HUB_CACHE) -> Iterator[None]:
    """Re-raise a network failure while fetching ``what`` as :class:`WeightsUnavailableError`.

    The message names the weight, the option that asked for it (``option``, e.g. ``model.weights``)
    and the local-file alternatives: download the file where there is network and pass it with
    ``model.init_from``, or place it in ``cache`` (where the downloading library looks first).
    """
    if option.lstrip("-") in ("model.init_from", "ckpt_path", "ckpt"):  # an option that takes a file path too
        local = f"give its path to `{option}` instead of the address"
    else:
        local = f"pass it with `--model.init_from /path/to/file.pth` (and set `{option}` to null)"
    try:
        yield
    except _NETWORK_ERRORS as err:
        raise WeightsUnavailableError(
            f"could not download {what} (requested by `{option}`): {err}. "
            f"Without network, download the weight file on another machine and either {local}, "
            f"or put it into {cache}."
        ) from err


# --- Checkpoints people already have: recognise the format, take the weights, map known key schemes.

MMPRETRAIN_RESNET_TO_TORCHVISION: tuple[tuple[str, str], ...] = (("backbone.", ""), ("head.fc.", "fc."))
"""MMPretrain ``ImageClassifier`` with ``ResNet`` backbone and ``LinearClsHead`` -> torchvision ``ResNet``.

MMPretrain's ResNet names its stem ``conv1``/``bn1``, stages ``layer1``..``layer4``, blocks
``conv{i}``/``bn{i}`` and shortcuts ``downsample.0`` (conv) / ``downsample.1`` (BN), as torchvision
does; only the ``backbone.`` / ``head.fc.`` prefixes differ. (ResNetV1c/V1d's deep stem ``stem.*``
and average-pool shortcuts have no torchvision counterpart and are reported as unexpected keys.)"""


def external_state_dict(checkpoint: Any) -> tuple[dict[str, Tensor], str, str]:
    """The weights inside a loaded checkpoint of a known format.

    Returns ``(state dict, prefix to strip by default, format name)``. Formats, by their keys:
    a Lightning checkpoint (``state_dict``, ``model.`` prefix stripped), an OpenMMLab checkpoint
    (``meta`` + ``state_dict``), a torchvision reference-script checkpoint (``model`` + ``args``),
    any other ``state_dict`` / ``model`` holder (timm's training script), or a plain state dict
    (timm / smp ``.safetensors`` and ``.pth``). A ``module.`` prefix on every key (a saved
    DataParallel / DDP wrapper) is stripped too.

    Raises:
        ValueError: no dict of tensors where these formats keep it.
    """
    if not isinstance(checkpoint, dict):
        raise ValueError(f"expected a dict of weights, found a {type(checkpoint).__name__}")
    fmt, state = "plain state dict", checkpoint
    if isinstance(checkpoint.get("state_dict"), dict):
        state = checkpoint["state_dict"]
        if "pytorch-lightning_version" in checkpoint or "refvision" in checkpoint:
            fmt = "Lightning checkpoint"
        elif isinstance(checkpoint.get("meta"), dict):
            fmt = "OpenMMLab checkpoint"
        else:
            fmt = "checkpoint with 'state_dict'"
    elif isinstance(checkpoint.get("model"), dict):
        state = checkpoint["model"]
        fmt = "torchvision reference checkpoint" if "args" in checkpoint else "checkpoint with 'model'"
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not state or not_tensors:
        raise ValueError(
            "no state dict found (expected tensors under 'state_dict' or 'model', or a dict of tensors); "
            f"non-tensor entries: {', '.join(map(str, not_tensors[:5])) or 'none (empty)'}"
        )
    prefix = ""
    for candidate in ("model.", "module."):
        if all(k.startswith(candidate) for k in state):
            prefix = candidate
            break
    return dict(state), prefix, fmt


def map_keys(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename ``state``'s keys into ``model``'s scheme where a verified mapping exists, else return it as is.

    Supported: :data:`MMPRETRAIN_RESNET_TO_TORCHVISION` (into a torchvision ``ResNet``).
    """
    if isinstance(model, ResNet) and "backbone.conv1.weight" in state and "conv1.weight" not in state:
        return {_rename(k, MMPRETRAIN_RESNET_TO_TORCHVISION): v for k, v in state.items()}
    return state


def _rename(key: str, rules: tuple[tuple[str, str], ...]) -> str:
    for old, new in rules:
        if key.startswith(old):
            return new + key[len(old) :]
    return key
