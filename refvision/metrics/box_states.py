"""What the detection metrics share: their per-box input check, their flat ``"cat"`` states, pycocotools'
summary of a precision array."""

import numpy as np
import torch
from torch import Tensor
from torchmetrics.utilities.data import dim_zero_cat


def checked_vector(item: dict, arg: str, i: int, key: str, length: int, floating: bool = False) -> Tensor:
    """``item[key]``, a tensor of shape ``(length,)`` (one value per box; a float tensor if ``floating``),
    else a ``ValueError`` naming ``<arg>[<i>]['<key>']`` and what was expected."""
    value = item.get(key)
    if not isinstance(value, Tensor) or value.shape != (length,):
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{arg}[{i}]['{key}']: expected a tensor of shape ({length},), one per box, got {got}")
    if floating and not value.is_floating_point():
        raise ValueError(f"{arg}[{i}]['{key}']: expected a float tensor, got {value.dtype}")
    return value


def cat_state(value: list[Tensor] | Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A list or gathered ``"cat"`` state as one CPU tensor (of ``dtype`` where given; empty if nothing was added)."""
    if isinstance(value, list) and not value:
        return torch.empty(0, dtype=dtype)
    state = dim_zero_cat(value).cpu()
    return state if dtype is None else state.to(dtype)


def mean_defined(precision: np.ndarray) -> float:
    """pycocotools' summary of a precision array: the mean of its entries > -1; NaN where none is."""
    defined = precision[precision > -1]
    return float(np.mean(defined)) if defined.size else float("nan")
