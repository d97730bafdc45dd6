"""Training losses that are not in PyTorch."""

import torch
import torch.nn.functional as F
from torch import Tensor


def ohem_cross_entropy(
    logits: Tensor, target: Tensor, ignore_index: int = 255, thresh: float = 0.7, min_kept: int = 100_000
) -> Tensor:
    """Cross-entropy over the hard pixels only (MMSegmentation's ``OHEMPixelSampler`` rule).

    A valid pixel is kept when the predicted probability of its true class is below
    ``max(thresh, p_k)``, ``p_k`` being the ``(min_kept + 1)``-th smallest such probability, so
    about ``min_kept`` pixels (or all valid ones) contribute at least.
    """
    with torch.no_grad():
        valid = target != ignore_index
        prob = logits.softmax(1).gather(1, target.clamp(max=logits.shape[1] - 1).unsqueeze(1)).squeeze(1)
        valid_prob = prob[valid]
        if valid_prob.numel() == 0:
            return logits.sum() * 0
        kth = valid_prob.sort().values[min(min_kept, valid_prob.numel() - 1)]
        keep = valid & (prob < max(thresh, float(kth)))
        if not keep.any():  # every valid pixel ties at the threshold
            keep = valid
    losses = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    return losses[keep].mean()
