"""Eager CPU: where DRConv reads group sizes on the host and works on chunks of samples."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

CHUNK_BYTES = 8 << 20
"""Bytes of patches (or generated filters) built at once on eager CPU: small enough to stay in cache
and to be reused by the allocator instead of fresh (page-faulting) memory on every call."""


def eager_cpu(tensor: Tensor) -> bool:
    """True for a plain CPU tensor in eager mode with no autograd recording: values can be read on
    the host for free and the ops need not be differentiable or traceable."""
    traced = (
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.onnx.is_in_onnx_export()
    )
    return not traced and tensor.device.type == "cpu" and type(tensor) is Tensor and not torch.is_grad_enabled()


def samples_per_chunk(sample_bytes: int) -> int:
    """How many samples of ``sample_bytes`` each make about :data:`CHUNK_BYTES` (at least 1)."""
    return max(1, CHUNK_BYTES // sample_bytes)


def in_sample_chunks(forward: Callable[[Tensor], Tensor], x: Tensor, sample_numel: int) -> Tensor:
    """``forward(x)``, run on chunks of samples where :func:`eager_cpu` allows, so that what
    ``forward`` builds per sample (``sample_numel`` numbers: DRConv's generated filters) stays near
    :data:`CHUNK_BYTES` instead of being built for the whole batch. ``forward`` must compute every
    sample on its own (DRConv: pooling, guide and filters are per sample), so the result is the same."""
    chunk = samples_per_chunk(sample_numel * x.element_size())
    if not eager_cpu(x) or chunk >= x.shape[0]:
        return forward(x)
    return torch.cat([forward(part) for part in x.split(chunk)])
