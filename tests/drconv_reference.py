"""Dense reference for DRConv, written independently of refvision's implementation.

Every region's output is computed at every pixel with ``F.conv2d`` and the hard one-hot
mask selects one per pixel. The guide's gradient comes from a straight-through mask,
``M = onehot + S - S.detach()`` with ``S = softmax(F)``: its value is the one-hot, and its
gradient is softmax's, which gives ``dL/dF = S * (g - sum_j S_j g_j)`` with
``g_j = sum_c dL/dY_c * Y^(j)_c``; the values ``onehot_j`` route each pixel's output gradient
to its own region's filter only. Costs ``m`` convs; used by the tests and the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class DenseDRConvResult:
    """``out`` (B, Cout, Ho, Wo); ``guide`` logits (B, m, Ho, Wo) (retains its gradient when
    it has one); ``responses`` ``Y^(j)`` of every region at every pixel (B, m, Cout, Ho, Wo)."""

    out: Tensor
    guide: Tensor
    responses: Tensor


def dense_drconv(module: nn.Module, x: Tensor) -> DenseDRConvResult:
    """DRConv's forward computed densely from ``module``'s parameters and geometry.

    Reads ``weight`` (None in the paper's layer), ``bias``, ``guide_weight``, ``guide_bias``, ``generator.reduce_*``,
    ``generator.expand_*``, ``stride``, integer ``padding``, ``dilation``, ``padding_mode``
    and ``regions``.
    """
    regions = module.regions
    out_channels, in_channels = module.out_channels, module.in_channels
    kh, kw = module.kernel_size
    batch = x.shape[0]
    stride, dilation = module.stride, module.dilation
    ph, pw = module.padding
    padded, padding = x, (ph, pw)
    if module.padding_mode != "zeros":
        padded, padding = F.pad(x, (pw, pw, ph, ph), mode=module.padding_mode), (0, 0)

    guide = F.conv2d(padded, module.guide_weight, module.guide_bias, stride, padding, dilation)
    if guide.requires_grad:
        guide.retain_grad()

    gen = module.generator
    pooled = F.adaptive_avg_pool2d(x, (kh, kw))
    hidden = torch.sigmoid(F.conv2d(pooled, gen.reduce_weight, gen.reduce_bias))
    dynamic = F.conv2d(hidden, gen.expand_weight, gen.expand_bias, groups=regions)
    filters = dynamic.view(batch, regions, out_channels, in_channels, kh, kw)
    if module.weight is not None:  # the residual variant: static kernel + dynamic filter
        filters = module.weight + filters

    per_sample = []
    for b in range(batch):
        all_regions = filters[b].reshape(regions * out_channels, in_channels, kh, kw)
        y = F.conv2d(padded[b : b + 1], all_regions, None, stride, padding, dilation)
        per_sample.append(y.view(regions, out_channels, *y.shape[-2:]))
    responses = torch.stack(per_sample)
    if module.bias is not None:
        responses = responses + module.bias.view(1, 1, -1, 1, 1)

    soft = torch.softmax(guide, dim=1)
    hard = F.one_hot(guide.argmax(1), regions).permute(0, 3, 1, 2).to(guide.dtype)
    mask = hard + soft - soft.detach()
    out = (mask.unsqueeze(2) * responses).sum(1)
    return DenseDRConvResult(out=out, guide=guide, responses=responses)


def softmax_rule(guide: Tensor, responses: Tensor, grad_out: Tensor) -> Tensor:
    """The paper's guide gradient ``S * (g - sum_j S_j g_j)``, written out.

    ``guide`` (B, m, Ho, Wo), ``responses`` (B, m, Cout, Ho, Wo), ``grad_out`` (B, Cout, Ho, Wo).
    """
    g = (grad_out.unsqueeze(1) * responses).sum(2)
    soft = torch.softmax(guide, dim=1)
    return soft * (g - (soft * g).sum(1, keepdim=True))
