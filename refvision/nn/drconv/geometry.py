"""Conv geometry both DRConv forms share: pair sizes and the padding the region conv is given."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

Pair = tuple[int, int]


def pad_input(
    x: Tensor, padding: Pair | str, padding_mode: str, kernel_size: Pair, dilation: Pair
) -> tuple[Tensor, Pair]:
    """Return ``(x, symmetric zero padding)`` for conv/unfold, padding ``x`` itself otherwise.

    Zero padding that is symmetric is left to the conv (so the static part is the same
    ``F.conv2d`` call ``nn.Conv2d`` makes); other modes and the asymmetric ``"same"`` case
    are applied with ``F.pad`` and the conv then pads by 0.
    """
    if padding == "valid":
        return x, (0, 0)
    if padding == "same":
        # nn.Conv2d's split: the extra pixel of an odd total goes to the right/bottom.
        totals = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        pads = [(total // 2, total - total // 2) for total in totals]
    else:
        pads = [(p, p) for p in _pair(padding)]
    (top, bottom), (left, right) = pads
    if not any((top, bottom, left, right)):
        return x, (0, 0)
    if padding_mode == "zeros" and top == bottom and left == right:
        return x, (top, left)
    mode = "constant" if padding_mode == "zeros" else padding_mode
    return F.pad(x, (left, right, top, bottom), mode=mode), (0, 0)
