"""``init_from``: load weights into a freshly built model before conversion.

Accepted sources are anything mmengine's ``CheckpointLoader`` resolves: a local file, a
``torchvision://<model>`` name, an ``http(s)://`` URL. Accepted contents: a Lightning
checkpoint (``state_dict`` with the task's ``model.`` prefix), an mmengine/torchvision-reference
checkpoint (``state_dict`` / ``model``), or a plain state dict.
"""

import logging
import os

import torch
from mmengine.runner.checkpoint import CheckpointLoader
from torch import nn

from refvision.models.weights import explain_download_failure

log = logging.getLogger("refvision")

LIGHTNING_PREFIX = "model."
"""The tasks keep their network as ``self.model``: Lightning checkpoints prefix its keys so."""


def extract_state_dict(checkpoint: dict, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Return the network's state dict from a loaded ``checkpoint``.

    ``prefix`` keeps only keys that start with it and strips it (e.g. ``backbone.`` to take a
    detector's backbone). ``None`` strips :data:`LIGHTNING_PREFIX` when every key carries it.
    """
    state = checkpoint
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("the checkpoint holds no state dict (expected keys 'state_dict' or 'model', or tensors)")
    if prefix is None:
        prefix = LIGHTNING_PREFIX if state and all(k.startswith(LIGHTNING_PREFIX) for k in state) else ""
    if not prefix:
        return dict(state)
    picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not picked:
        raise ValueError(f"no key starts with init_prefix={prefix!r}; first keys: {list(state)[:5]}")
    return picked


def load_init_from(model: nn.Module, source: str, prefix: str | None = None, strict: bool = True) -> None:
    """Load ``source`` into ``model`` (in place), as described in the module docstring.

    Raises:
        FileNotFoundError: a local path that does not exist.
        ValueError: keys or shapes that do not fit ``model``; the message lists the first
            missing / unexpected / mismatched keys and names ``init_prefix`` / ``init_strict``.
        WeightsUnavailableError: a URL or named weight that cannot be downloaded.
    """
    is_local = "://" not in source
    if is_local and not os.path.isfile(source):
        raise FileNotFoundError(f"model.init_from={source!r}: no such file")
    with explain_download_failure(source, "model.init_from"):
        checkpoint = CheckpointLoader.load_checkpoint(source, map_location="cpu")
    try:
        state = extract_state_dict(checkpoint, prefix)
    except ValueError as err:
        raise ValueError(f"model.init_from={source!r}: {err}") from None
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if mismatched or (strict and (missing or unexpected)):
        details = "; ".join(
            f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for label, keys in (("shape mismatch", mismatched), ("missing", missing), ("unexpected", unexpected))
            if keys
        )
        raise ValueError(
            f"model.init_from={source!r} does not fit {type(model).__name__}: {details}. "
            "Use model.init_prefix to pick a sub-tree of the checkpoint, or model.init_strict=false "
            "to allow missing/unexpected keys (shapes must still match)."
        )
    model.load_state_dict(state, strict=False)
    log.info("init_from %s: loaded %d tensors (%d missing, %d unexpected)", source, len(state) - len(unexpected),
             len(missing), len(unexpected))
