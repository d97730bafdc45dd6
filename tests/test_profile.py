"""profile against parameter and multiply-add counts worked out by hand."""

import pytest
import torch
from torch import nn

from refvision import convert, profile, reparameterize
from refvision.surgery.profile import ModelProfile

# Input 1x3x10x10; every layer keeps 10x10.
H = W = 10
STEM = 8 * 3 * 3 * 3  # Conv2d(3, 8, 3): 216 weights
DEPTHWISE = 8 * 1 * 3 * 3  # Conv2d(8, 8, 3, groups=8): 72 weights
POINTWISE = 4 * 8 + 4  # Conv2d(8, 4, 1) with bias: 36
MACS = (8 * H * W) * (3 * 9) + (8 * H * W) * 9 + (4 * H * W) * 8  # 21600 + 7200 + 3200
# RefConv maps, default groups: stem N = 24 kernels, G = 24 -> (24, 1, 3, 3);
# depthwise N = 8, G = 1 -> (8, 8, 3, 3). Computing Wt is a conv over a (1, N, 3, 3) image.
STEM_MAP, DEPTHWISE_MAP = 24 * 1 * 9, 8 * 8 * 9
MAP_MACS = (24 * 9) * (1 * 9) + (8 * 9) * (8 * 9)


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        nn.ReLU(),
        nn.Conv2d(8, 4, 1),
    )


VANILLA = ModelProfile(
    params_total=STEM + DEPTHWISE + POINTWISE,
    params_trainable=STEM + DEPTHWISE + POINTWISE,
    params_training_only=0,
    params_frozen=0,
    flops=MACS,
)


def test_vanilla_counts():
    assert profile(tiny(), (1, 3, H, W)) == VANILLA


def test_refconv_counts_and_deploy_form():
    model = convert(tiny(), "refconv", select="kxk")
    train = profile(model, (1, 3, H, W))
    assert train == ModelProfile(
        params_total=STEM + DEPTHWISE + POINTWISE + STEM_MAP + DEPTHWISE_MAP,
        params_trainable=POINTWISE + STEM_MAP + DEPTHWISE_MAP,
        params_training_only=STEM_MAP + DEPTHWISE_MAP,
        params_frozen=STEM + DEPTHWISE,
        flops=MACS + MAP_MACS,
    )
    assert profile(reparameterize(model), (1, 3, H, W)) == VANILLA
    assert model.training


def test_frozen_parameters_and_explicit_inputs():
    model = tiny()
    model[4].bias.requires_grad_(False)
    counted = profile(model, inputs=torch.randn(2, 3, H, W))
    assert counted.params_frozen == 4 and counted.params_trainable == VANILLA.params_total - 4
    assert counted.flops == 2 * MACS


@pytest.mark.parametrize("kwargs", [{}, dict(input_shape=(1, 3, H, W), inputs=torch.randn(1, 3, H, W))])
def test_needs_exactly_one_input_spec(kwargs):
    with pytest.raises(ValueError, match="exactly one of input_shape or inputs"):
        profile(tiny(), **kwargs)


def test_table():
    assert str(VANILLA).splitlines() == [
        "count                   value",
        "-----------------------------",
        "params_total              324",
        "params_trainable          324",
        "params_training_only        0",
        "params_frozen               0",
        "flops                  32,000",
    ]


def test_drconv_counts_its_real_work_in_both_forms():
    """Two 1x1 8->8 convs at 16x16, both DRConv (m = 4), counted by hand."""
    from refvision.nn.drconv import tile_rows

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.ReLU(), nn.Conv2d(8, 8, 1, bias=False))
    pixels, m, c = 16 * 16, 4, 8
    assert profile(plain, (1, c, 16, 16)).flops == 2 * pixels * c * c
    model = convert(plain, "drconv", select="all", regions=4)
    tile = tile_rows(pixels, m)
    tiles = -(-pixels // tile) + m  # tiles per sample
    region_gemm = tiles * tile * c * c  # one conv's rows plus tile padding
    guide = pixels * m * c  # 1x1 conv 8 -> m
    pool = c * pixels  # adaptive_avg_pool2d to 1x1: one add per input
    reduce = m * m * c  # 1x1 conv 8 -> m^2 on the pooled 1x1 map
    expand = m * (c * c) * m  # m groups of m -> Cout*Cin, as one bmm
    per_layer = region_gemm + guide + pool + reduce + expand
    assert tiles * tile >= pixels and region_gemm < m * pixels * c * c
    assert profile(model, (1, c, 16, 16)).flops == 2 * per_layer
    assert profile(reparameterize(model), (1, c, 16, 16)).flops == 2 * per_layer


def test_profile_command_with_device_and_input_size(capsys):
    from refvision.app.commands import profile_command

    profile_command(
        [
            "-c",
            "configs/demo/classification.yaml",
            "--device",
            "cpu",
            "--input_size",
            "[40, 48]",
            "--min_run_time",
            "0.01",
        ]
    )
    out, err = capsys.readouterr()
    assert "counting FLOPs of the train form" in err and "timing the deploy form" in err
    assert "latency ms (median, cpu)" in out and "latency ms (IQR)" in out
    assert f"latency: input 3x40x48, batch 1, {torch.get_num_threads()} threads, cpu;" in out
