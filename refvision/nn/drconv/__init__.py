"""DRConv: dynamic region-aware convolution (Chen et al., CVPR 2021, arXiv 2003.12243).

A learned *guide* conv splits the output plane into ``m`` regions (per-pixel argmax), and
every region gets its own input-dependent filter; each output pixel is computed with the
one filter of its region.

Choices made here (docs/methods.md states what the paper and the official code do, and where
refvision differs):

* **Filter generator: the paper's**, ``AdaptiveAvgPool2d((kh, kw))`` -> 1x1 conv
  ``Cin -> m^2`` -> sigmoid -> grouped 1x1 conv ``m^2 -> m*Cout*Cin`` (``m`` groups) ->
  ``m`` filters ``D_j(b)`` of ``Cout x Cin x kh x kw`` per sample (not the official code's
  CondConv-style mixture of basis kernels).
* **Two forms, one option** (``residual``). ``residual=False`` is the paper's layer: region
  ``j``'s filter is ``D_j(b)``, there is no static kernel (``weight`` is None), the generator
  starts at ``nn.Conv2d``'s default scale, and guide and generator get gradient from step 0;
  use it to train from scratch. ``residual=True`` (default) is the *function-preserving
  residual variant*: the filter is ``weight + D_j(b)`` with ``weight`` the replaced conv's
  kernel and ``D`` zero-initialised, so ``from_conv(conv)`` returns ``conv``'s outputs (up to
  float rounding) until trained; its guide gets zero gradient on the first step (all regions
  share one filter) and learns from the second. Use it to fine-tune a trained conv.
* **Backward through the argmax (paper's rule).** The forward pass uses the hard one-hot
  mask; with ``S = softmax(F)`` over regions and ``g_j = sum_c dL/dY_c * Y^(j)_c``, the guide
  logits get ``dL/dF = S * (g - sum_j S_j g_j)``. Region ``j``'s filter only receives
  gradient from pixels assigned to ``j``.
* **Cost.** The static kernel is folded into every (sample, region) filter and the output
  pixels become GEMM rows grouped by (sample, region), so the region conv has one conv's
  multiply-adds, never ``m`` dense convs. Two layouts of those rows, one result:
  :class:`GroupedLayout` (eager CPU without autograd recording, which covers the Function's
  forward and backward, eval and the deploy form): pixels sorted by (sample, region), one GEMM
  per non-empty group with its filter read in place, samples in chunks so that neither the patch
  matrix nor (at inference) the generator's output is built for the whole batch; the group sizes
  are read on the host, free on CPU. :class:`TiledLayout` (CUDA, autograd-recording calls,
  traced and exported graphs): fixed-size tiles, one ``torch.bmm``, at most ``m * T`` padding
  rows per sample (:func:`region_conv_macs`); every shape depends on the input's shape only and
  nothing is read back to the host, so CUDA runs it without syncs and the inference form exports;
  each tile copies its filter (``B * (P / T + m)`` filters). Backward: one GEMM each for the
  input and the filter gradients; the guide gradient needs every region's response at every
  pixel (inherent to the rule): ``m - 1`` region GEMMs / convs on ``filters[j] - filters[0]``,
  one region at a time, so the extra memory is one output-sized buffer. Only ``x``, the
  filters, the guide logits and index vectors are saved. The generator's output holds
  ``B * m * Cout * Cin * kh * kw`` numbers (and its last layer ``m^2 * Cout * Cin`` weights), the
  price of the paper's generator.
* **Mixed precision.** Under ``torch.autocast`` the guide and generator run in reduced
  precision like any conv; the region conv itself casts its inputs to float32 and runs
  with autocast disabled (forward and backward), returning float32.
"""

from refvision.nn.drconv.deploy import DRConvDeploy
from refvision.nn.drconv.function import drconv2d
from refvision.nn.drconv.generator import RegionFilterGenerator
from refvision.nn.drconv.layer import DRConv
from refvision.nn.drconv.layouts import region_conv_macs, tile_rows

__all__ = ["DRConv", "DRConvDeploy", "RegionFilterGenerator", "drconv2d", "region_conv_macs", "tile_rows"]
