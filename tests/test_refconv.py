"""RefConv against an independent float64 re-implementation of Wt = Wb + T(Wb)."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from refvision.nn.refconv import RefConv


def reference_refocus(basis: torch.Tensor, refocus: torch.Tensor, map_groups: int) -> torch.Tensor:
    """Wt by explicit loops: kernel n of the flattened basis gets
    sum_{j, a, b} R[n, j, a, b] * B[group_start(n) + j, y + a - top, x + b - left]
    with zeros outside the kernel, top = (mh - 1) // 2, left = (mw - 1) // 2."""
    cout, cin_g, kh, kw = basis.shape
    n_kernels = cout * cin_g
    per_group = n_kernels // map_groups
    mh, mw = refocus.shape[2:]
    top, left = (mh - 1) // 2, (mw - 1) // 2
    b = basis.detach().cpu().double().numpy().reshape(n_kernels, kh, kw)
    r = refocus.detach().cpu().double().numpy()
    out = b.copy()
    for n, y, x in itertools.product(range(n_kernels), range(kh), range(kw)):
        start = (n // per_group) * per_group
        total = 0.0
        for j, a, c in itertools.product(range(per_group), range(mh), range(mw)):
            yy, xx = y + a - top, x + c - left
            if 0 <= yy < kh and 0 <= xx < kw:
                total += r[n, j, a, c] * b[start + j, yy, xx]
        out[n, y, x] += total
    return torch.from_numpy(out.reshape(basis.shape))


def reference_forward(layer: RefConv, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if layer.padding_mode != "zeros":
        ph, pw = layer.padding
        x = F.pad(x, (pw, pw, ph, ph), mode=layer.padding_mode)
        padding = 0
    else:
        padding = layer.padding
    return F.conv2d(x, weight, layer.bias, layer.stride, padding, layer.dilation, layer.groups)


CONFIGS = {
    # name: (conv kwargs, RefConv kwargs, expected map_groups, expected map kernel)
    "depthwise3x3": (dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6), {}, 1, (3, 3)),
    "depthwise5x5_stride2": (
        dict(in_channels=6, out_channels=6, kernel_size=5, stride=2, padding=2, groups=6),
        {},
        1,
        (3, 3),
    ),
    "depthwise5x5_map5": (
        dict(in_channels=4, out_channels=4, kernel_size=5, padding=2, groups=4),
        dict(map_k=5),
        1,
        (5, 5),
    ),
    "regular3x3_bias": (dict(in_channels=3, out_channels=4, kernel_size=3, padding=1), {}, 12, (3, 3)),
    "regular3x3_explicit_groups": (
        dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, bias=False),
        dict(map_groups=3),
        3,
        (3, 3),
    ),
    "grouped3x3_dilation2": (
        dict(in_channels=4, out_channels=4, kernel_size=3, padding=2, dilation=2, groups=2),
        {},
        4,
        (3, 3),
    ),
    "pointwise1x1": (dict(in_channels=4, out_channels=5, kernel_size=1), {}, 20, (1, 1)),
    "stem4x4_stride4": (dict(in_channels=3, out_channels=4, kernel_size=4, stride=4), {}, 12, (3, 3)),
    "downsample2x2": (dict(in_channels=3, out_channels=4, kernel_size=2, stride=2), {}, 12, (2, 2)),
    "depthwise2x2_dense": (dict(in_channels=4, out_channels=4, kernel_size=2, groups=4, bias=False), {}, 1, (2, 2)),
    "even_map_on_3x3": (
        dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4),
        dict(map_k=2),
        1,
        (2, 2),
    ),
    "rect1x7": (dict(in_channels=4, out_channels=4, kernel_size=(1, 7), padding=(0, 3), groups=4), {}, 1, (1, 3)),
    "reflect_padding": (
        dict(in_channels=3, out_channels=3, kernel_size=3, padding=1, groups=3, padding_mode="reflect"),
        {},
        1,
        (3, 3),
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_refocused_weight_and_forward_match_reference(name, device):
    conv_kwargs, ref_kwargs, map_groups, map_kernel = CONFIGS[name]
    torch.manual_seed(0)
    layer = RefConv(**conv_kwargs, **ref_kwargs, dtype=torch.float64, device=device)
    with torch.no_grad():
        layer.refocus_weight.normal_(std=0.3)
        if layer.bias is not None:
            layer.bias.normal_()
    assert layer.map_groups == map_groups
    assert tuple(layer.refocus_weight.shape[2:]) == map_kernel
    n = layer.weight.shape[0] * layer.weight.shape[1]
    assert layer.refocus_weight.shape[:2] == (n, n // map_groups)

    expected_wt = reference_refocus(layer.weight, layer.refocus_weight, map_groups).to(device)
    assert layer.refocused_weight().shape == layer.weight.shape
    torch.testing.assert_close(layer.refocused_weight(), expected_wt, rtol=1e-12, atol=1e-12)

    x = torch.randn(2, conv_kwargs["in_channels"], 11, 12, dtype=torch.float64, device=device)
    plain = nn.Conv2d(**conv_kwargs, dtype=torch.float64, device=device)
    expected = reference_forward(layer, x, expected_wt)
    y = layer(x)
    assert y.shape == plain(x).shape == expected.shape
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.fuse()(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "conv_kwargs",
    [
        dict(in_channels=3, out_channels=3, kernel_size=3, padding=1, groups=3),
        dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=1),
        dict(in_channels=2, out_channels=2, kernel_size=2, groups=2),
    ],
)
def test_gradcheck_input_and_refocus_weight(conv_kwargs, device):
    torch.manual_seed(0)
    layer = RefConv(**conv_kwargs, dtype=torch.float64, device=device)
    x = torch.randn(1, conv_kwargs["in_channels"], 5, 5, dtype=torch.float64, device=device, requires_grad=True)
    r = layer.refocus_weight.detach().clone().requires_grad_(True)

    def run(x, r):
        return torch.func.functional_call(layer, {"refocus_weight": r}, (x,))

    assert torch.autograd.gradcheck(run, (x, r))


def test_honours_stride_dilation_padding_changed_after_construction():
    torch.manual_seed(0)
    layer = RefConv(4, 4, 3, stride=2, padding=1, groups=4)
    refocus_before = layer.refocus_weight.detach().clone()
    layer.stride, layer.dilation, layer.padding = (1, 1), (2, 2), (2, 2)
    x = torch.randn(1, 4, 9, 9)
    expected = F.conv2d(x, layer.refocused_weight(), layer.bias, 1, 2, 2, 4)
    assert layer(x).shape == (1, 4, 9, 9)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.fuse()(x), expected)
    assert torch.equal(layer.refocus_weight, refocus_before)


def test_basis_is_a_frozen_buffer():
    torch.manual_seed(0)
    layer = RefConv.from_conv(nn.Conv2d(3, 4, 3, padding=1))
    assert "weight" not in dict(layer.named_parameters())
    assert "weight" in dict(layer.named_buffers())
    assert set(dict(layer.named_parameters())) == {"bias", "refocus_weight"}
    assert set(layer.state_dict()) == {"weight", "bias", "refocus_weight"}

    basis = layer.weight.clone()
    refocus, bias = layer.refocus_weight.detach().clone(), layer.bias.detach().clone()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(2):
        optimizer.zero_grad()
        layer(torch.randn(2, 3, 6, 6)).square().mean().backward()
        optimizer.step()
    assert torch.equal(layer.weight, basis)
    assert not torch.equal(layer.refocus_weight, refocus)
    assert not torch.equal(layer.bias, bias)


def test_zero_init_reproduces_the_original_conv_exactly(device):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4, device=device)
    layer = RefConv.from_conv(conv, init="zeros")
    x = torch.randn(2, 4, 8, 8, device=device)
    assert torch.equal(layer(x), conv(x))


def test_from_conv_copies_geometry_mode_and_checkpoint_keys():
    conv = nn.Conv2d(4, 6, (3, 5), stride=(1, 2), padding=(1, 2), dilation=(2, 1), bias=False).eval()
    layer = RefConv.from_conv(conv)
    for attr in (
        "in_channels",
        "out_channels",
        "kernel_size",
        "stride",
        "padding",
        "dilation",
        "groups",
        "padding_mode",
    ):
        assert getattr(layer, attr) == getattr(conv, attr)
    assert layer.bias is None and not layer.training
    assert torch.equal(layer.weight, conv.weight)
    assert "map_k=3" in repr(layer) and "map_groups=24" in repr(layer)

    deployed = layer.fuse()
    assert type(deployed) is nn.Conv2d and not deployed.training
    assert {k: v.shape for k, v in deployed.state_dict().items()} == {k: v.shape for k, v in conv.state_dict().items()}


def test_all_zero_basis_is_refused():
    conv = nn.Conv2d(3, 4, 3)
    nn.init.zeros_(conv.weight)
    with pytest.raises(ValueError, match="pretrained or baseline weights"):
        RefConv.from_conv(conv)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(map_k=0), "map_k must be >= 1, got 0"),
        (dict(init="ones"), r"init must be one of \('default', 'zeros'\), got 'ones'"),
        (dict(map_groups=5), "map_groups=5 must be a positive divisor of N .* = 12"),
    ],
)
def test_invalid_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RefConv(3, 4, 3, **kwargs)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_runs_the_transform_in_weight_dtype(amp_dtype: torch.dtype, device: str):
    torch.manual_seed(0)
    layer = RefConv(4, 4, 3, padding=1, groups=4, device=device)
    x = torch.randn(2, 4, 8, 8, device=device)
    with torch.autocast(device, dtype=amp_dtype):
        wt = layer.refocused_weight()
        y = layer(x)
    assert wt.dtype == torch.float32 and torch.equal(wt, layer.refocused_weight())
    assert y.dtype == amp_dtype
    y.float().sum().backward()
    assert layer.refocus_weight.grad is not None and layer.refocus_weight.grad.dtype == torch.float32
