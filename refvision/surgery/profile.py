"""Parameter and FLOP counts that keep training-only RefConv parts apart.

A RefConv model has more numbers while training than after ``reparameterize``; counting
them together is the usual source of confusing comparisons. ``profile`` reports both.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from mmengine.analysis import FlopAnalyzer
from torch import nn

from refvision.nn import ConvMethod
from refvision.utils.text_table import render_table


@dataclass(frozen=True)
class ModelProfile:
    """Counts for one model.

    - ``params_total``: every parameter plus every conv method's basis held as a buffer
      (RefConv's; part of the model's kernel); ``params_total == params_trainable + params_frozen``.
    - ``params_trainable``: parameters with ``requires_grad``.
    - ``params_training_only``: numbers that disappear under ``reparameterize``
      (``ConvMethod.training_only_numel``: RefConv's ``refocus_weight``, ACConv's branches);
      ``params_total - params_training_only`` is the deployed model's ``params_total``.
    - ``params_frozen``: basis buffers and parameters without ``requires_grad``.
    - ``flops``: multiply-adds of one forward pass in eval mode, as counted by
      mmengine's ``FlopAnalyzer``: one fused multiply-add = one flop for convs and
      matmuls, its own estimates for normalization and pooling, 0 for ops it has no
      handler for (elementwise adds, activations, padding). For a RefConv model this
      includes computing each refocused kernel, which every training step does and
      the deployed model does not. An op of a conv method's own that the tracer cannot look
      into (an autograd Function) is counted by the handle the method declares
      (``ConvMethod.flop_handles``; DRConv's region conv: the multiply-adds of its batched GEMM,
      one conv's plus the tile padding); the method's other ops are ordinary ops, counted as such.
    """

    params_total: int
    params_trainable: int
    params_training_only: int
    params_frozen: int
    flops: int

    def table(self) -> str:
        """Two columns: count name, value with thousands separators."""
        return render_table(("count", "value"), [(f.name, f"{getattr(self, f.name):,}") for f in fields(self)])

    def __str__(self) -> str:
        return self.table()


def profile(model: nn.Module, input_shape: Sequence[int] | None = None, *, inputs: Any = None) -> ModelProfile:
    """Count ``model``'s parameters and the FLOPs of one forward on ``inputs``.

    Give exactly one of ``input_shape`` (the input is ``torch.randn(input_shape)`` on the
    model's device and dtype, e.g. ``(1, 3, 224, 224)``) or ``inputs`` (a tensor or a
    tuple of positional arguments). The FLOP count runs on a deep copy in eval mode
    under ``torch.no_grad``; ``model`` itself is not touched.
    """
    if (input_shape is None) == (inputs is None):
        raise ValueError("profile: give exactly one of input_shape or inputs")
    params = list(model.parameters())
    converted = [m for m in model.modules() if isinstance(m, ConvMethod)]
    trainable = sum(p.numel() for p in params if p.requires_grad)
    frozen = sum(p.numel() for p in params if not p.requires_grad)
    frozen += sum(basis.numel() for m in converted if (basis := m.frozen_basis()) is not None)
    training_only = sum(m.training_only_numel() for m in converted)

    if inputs is None:
        reference = next(iter([*params, *model.buffers()]), torch.empty(0))
        inputs = torch.randn(*input_shape, device=reference.device, dtype=reference.dtype)
    return ModelProfile(
        params_total=trainable + frozen,
        params_trainable=trainable,
        params_training_only=training_only,
        params_frozen=frozen,
        flops=_count_flops(model, inputs),
    )


def _count_flops(model: nn.Module, inputs: Any) -> int:
    probe = copy.deepcopy(model).eval()
    handles: dict[str, Any] = {}
    for method in {type(m) for m in probe.modules() if isinstance(m, ConvMethod)}:
        handles.update(method.flop_handles)
    with torch.no_grad():
        analyzer = (
            FlopAnalyzer(probe, inputs)
            .unsupported_ops_warnings(False)  # one log line per op type it does not count
            .uncalled_modules_warnings(False)
            .tracer_warnings("none")
            .set_op_handle(**handles)
        )
        return int(analyzer.total())
