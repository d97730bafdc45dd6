"""convert / reparameterize on hand-built and real (torchvision, smp) models."""

import copy
import logging
import math

import pytest
import segmentation_models_pytorch as smp
import torch
import torchvision
from torch import nn

from refvision import DRConv, RefConv, convert, reparameterize
from refvision.nn import registered_methods
from refvision.surgery.convert import Replacement, conversion_report, format_report


def randomize_refocus(model: nn.Module) -> None:
    """Give every refocusing map a clearly non-trivial value (not the layer's own init)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RefConv):
                m.refocus_weight.normal_(std=0.3 / math.sqrt(m.refocus_weight[0].numel()))


def calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Set BN running statistics from one batch, as training would: with the default
    (0, 1) statistics a randomly initialized deep net's activations fade towards
    denormals and its output is the head's bias, which no test could tell apart."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def count(model: nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def check_round_trip(build, select: str, size: int, **options) -> None:
    """converted == reparameterized == a fresh vanilla model loaded (strict) from the
    reparameterized state_dict, all in eval mode; rtol 1e-5, atol 1e-5 * max|output|."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    model = calibrate_batchnorm(build(), torch.randn(2, 3, size, size))
    vanilla_shapes = {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        original = model(x)
    convert(model, "refconv", select=select, **options)
    randomize_refocus(model)
    deploy = reparameterize(model)
    fresh = build().eval()
    fresh.load_state_dict(deploy.state_dict(), strict=True)
    with torch.no_grad():
        converted, deployed, reloaded = model(x), deploy(x), fresh(x)

    assert count(model, RefConv) == len(conversion_report(model)) > 0
    assert count(deploy, RefConv) == 0 and not deploy.training
    assert {k: v.shape for k, v in deploy.state_dict().items()} == vanilla_shapes
    scale = converted.abs().max().item()
    change = (converted - original).abs().max().item()
    delta_deploy = (deployed - converted).abs().max().item()
    delta_reload = (reloaded - converted).abs().max().item()
    print(
        f"\n{build.__name__} select={select}: {count(model, RefConv)} RefConv, max|out|={scale:.3g}, "
        f"max|converted-original|={change:.3g}, max|deployed-converted|={delta_deploy:.3g}, "
        f"max|reloaded-converted|={delta_reload:.3g}"
    )
    assert change > 1e-2 * scale, "refocusing should change the outputs"
    torch.testing.assert_close(deployed, converted, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(reloaded, converted, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize(
    "name, select, size",
    [
        ("mobilenet_v2", "kxk", 64),
        ("mobilenet_v3_large", "depthwise", 64),
        ("resnet18", "kxk", 64),
        ("shufflenet_v2_x1_0", "kxk", 64),
        ("convnext_tiny", "kxk", 32),
        ("efficientnet_b0", "depthwise", 64),
    ],
)
def test_torchvision_round_trip(name, select, size):
    def build():
        return getattr(torchvision.models, name)(weights=None)

    build.__name__ = name
    check_round_trip(build, select, size)


def test_deeplabv3plus_encoder_round_trip_keeps_dilation():
    def build():
        return smp.DeepLabV3Plus(encoder_name="mobilenet_v2", encoder_weights=None, encoder_output_stride=8, classes=5)

    torch.manual_seed(0)
    probe = convert(build(), "refconv", select="kxk", include="encoder.*")
    assert any(m.dilation[0] > 1 for m in probe.modules() if isinstance(m, RefConv))
    assert all(r.name.startswith("encoder.") for r in conversion_report(probe))

    build.__name__ = "DeepLabV3Plus(mobilenet_v2, os=8)"
    check_round_trip(build, "kxk", 64, include="encoder.*")


def test_dilating_after_conversion_matches_dense_reference():
    """smp's make_dilated rewrites stride/dilation/padding of every nn.Conv2d it walks:
    a RefConv must follow them, and its refocusing map must not be touched."""
    torch.manual_seed(0)
    encoder = smp.encoders.get_encoder("mobilenet_v2", weights=None)
    calibrate_batchnorm(encoder, torch.randn(2, 3, 64, 64))
    convert(encoder, "refconv", select="kxk")
    randomize_refocus(encoder)
    maps = {n: p.detach().clone() for n, p in encoder.named_parameters() if n.endswith("refocus_weight")}
    deploy_before = reparameterize(encoder)

    encoder.make_dilated(output_stride=8)
    deploy_before.make_dilated(output_stride=8)
    deploy_after = reparameterize(encoder)

    assert all(torch.equal(p, maps[n]) for n, p in encoder.named_parameters() if n in maps)
    refconvs = [m for m in encoder.modules() if isinstance(m, RefConv)]
    assert any(m.dilation == (4, 4) and m.stride == (1, 1) for m in refconvs)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outputs = encoder(x), deploy_before(x), deploy_after(x)
    assert outputs[0][-1].shape[-1] == 8
    for converted, before, after in zip(*outputs):
        scale = converted.abs().max().item()
        torch.testing.assert_close(before, converted, rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(after, converted, rtol=1e-5, atol=1e-5 * scale)


def conv_census(model: nn.Module) -> dict[str, int]:
    convs = [m for m in model.modules() if type(m) is nn.Conv2d]
    return {
        "all": len(convs),
        "kxk": sum(m.weight.shape[2] * m.weight.shape[3] > 1 for m in convs),
        "pointwise": sum(m.weight.shape[2:] == (1, 1) and m.weight.shape[1] == m.in_channels for m in convs),
        "depthwise": sum(m.weight.shape[1] == 1 and m.in_channels > 1 for m in convs),
    }


@pytest.fixture(scope="module")
def mobilenet_v2():
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2(weights=None)


def test_select_counts_on_mobilenet_v2(mobilenet_v2):
    census = conv_census(mobilenet_v2)
    # stem 3x3 + 17 depthwise 3x3; 16 expand + 17 project + last 1x1
    assert census == {"all": 52, "kxk": 18, "pointwise": 34, "depthwise": 17}
    for select, expected in census.items():
        model = convert(copy.deepcopy(mobilenet_v2), "refconv", select=select)
        assert count(model, RefConv) == len(conversion_report(model)) == expected, select
        assert conv_census(model)["all"] == census["all"] - expected


def test_include_and_exclude(mobilenet_v2):
    model = convert(
        copy.deepcopy(mobilenet_v2),
        "refconv",
        select="all",
        include=["features.1.*", "features.2.*"],
        exclude="*.conv.1.0",
    )
    assert [r.name for r in conversion_report(model)] == [
        "features.1.conv.0.0",
        "features.1.conv.1",
        "features.2.conv.0.0",
        "features.2.conv.2",
    ]
    assert isinstance(model.features[2].conv[2], RefConv)
    assert type(model.features[2].conv[1][0]) is nn.Conv2d


def test_nothing_matched_names_the_selection(mobilenet_v2):
    with pytest.raises(ValueError) as err:
        convert(copy.deepcopy(mobilenet_v2), "refconv", select="depthwise", include="classifier*")
    message = str(err.value)
    for part in (
        "kind='refconv'",
        "select='depthwise'",
        "include='classifier*'",
        "exclude=None",
        "18 kxk, 34 pointwise, 17 depthwise plain convs",
    ):
        assert part in message


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            dict(kind="repvgg"),
            ValueError,
            f"conv kind 'repvgg' is unknown; registered: {', '.join(sorted(registered_methods()))},",
        ),
        (
            dict(kind="refconv", select="3x3"),
            ValueError,
            "unknown select '3x3'; allowed: depthwise, kxk, pointwise, all",
        ),
        (
            dict(kind="refconv", map_size=3),
            TypeError,
            "convert\\(kind='refconv'\\): map_size: conv kind 'refconv' has no option 'map_size'; its options: "
            "map_k: int = 3, map_groups: int \\| None = None, init: 'default' \\| 'zeros' = 'default'$",
        ),
        (
            dict(kind="drconv", map_k=3),
            TypeError,
            "map_k: conv kind 'drconv' has no option 'map_k'; its options: regions: int = 8, residual: bool = True$",
        ),
        (dict(kind="drconv", regions="8"), TypeError, "regions: conv kind 'drconv' expects int, got '8'"),
        (dict(kind="refconv", init="ones"), ValueError, "init: conv kind 'refconv' expects 'default' \\| 'zeros'"),
    ],
)
def test_argument_errors(kwargs, error, match):
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(error, match=match):
        convert(model, **kwargs)
    assert type(model[0]) is nn.Conv2d


def test_converting_twice_does_not_nest(mobilenet_v2):
    model = convert(copy.deepcopy(mobilenet_v2), "refconv", select="kxk", map_k=3)
    with pytest.raises(ValueError, match="18 already converted"):
        convert(model, "refconv", select="kxk")
    convert(model, "refconv", select="all")
    assert count(model, RefConv) == 52 == len(conversion_report(model))
    assert all(not list(m.children()) for m in model.modules() if isinstance(m, RefConv))
    assert len({r.name for r in conversion_report(model)}) == 52


def test_drconv_takes_only_ungrouped_convs_and_is_never_entered():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.Conv2d(8, 4, 1),
    ).eval()
    convert(model, "drconv", select="all")
    assert [type(m) for m in model] == [DRConv, nn.ReLU, nn.Conv2d, DRConv]
    convert(model, "refconv", select="all")
    assert isinstance(model[2], RefConv) and count(model, RefConv) == 1
    assert [r.kind for r in conversion_report(model)] == ["drconv", "drconv", "refconv"]

    x = torch.randn(2, 3, 8, 8)
    deploy = reparameterize(model)
    assert count(deploy, DRConv) == 0 and count(deploy, RefConv) == 0
    assert not any(m.training for m in deploy.modules())
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), model(x))


def test_shared_conv_stays_shared():
    shared = nn.Conv2d(4, 4, 3, padding=1)
    model = convert(nn.Sequential(shared, nn.ReLU(), shared), "refconv")
    assert isinstance(model[0], RefConv) and model[0] is model[2]
    deploy = reparameterize(model)
    assert type(deploy[0]) is nn.Conv2d and deploy[0] is deploy[2]


def test_failed_conversion_leaves_model_untouched():
    dead = nn.Conv2d(4, 4, 3)
    nn.init.zeros_(dead.weight)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), dead)
    with pytest.raises(ValueError, match=r"cannot convert '1' .*pretrained or baseline weights"):
        convert(model, "refconv")
    assert count(model, RefConv) == 0 and conversion_report(model) == []


def test_report_table_deepcopy_and_log(caplog):
    model = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.Sequential(nn.Conv2d(16, 16, (1, 7), groups=16)))
    with caplog.at_level(logging.INFO, logger="refvision"):
        convert(model, "refconv", map_k=3, init="zeros")
    assert [r.message for r in caplog.records if r.name == "refvision"] == [
        "convert: 2 conv(s) -> refconv (select=kxk, include=None, exclude=None, options={'map_k': 3, 'init': 'zeros'})"
    ]
    report = conversion_report(model)
    assert report == [
        Replacement("0", "refconv", 3, 16, (3, 3), (2, 2), 1, (1, 1)),
        Replacement("1.0", "refconv", 16, 16, (1, 7), (1, 1), 16, (1, 1)),
    ]
    assert format_report(report).splitlines() == [
        "name      kind   in   out   kernel   stride   groups   dilation",
        "---------------------------------------------------------------",
        "0      refconv    3    16      3x3      2x2        1        1x1",
        "1.0    refconv   16    16      1x7      1x1       16        1x1",
    ]
    assert conversion_report(copy.deepcopy(model)) == report
    assert all("replacement" not in key for key in model.state_dict())


def test_reparameterize_copies_unless_inplace_and_keeps_modes():
    model = convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "refconv")
    model[1].eval()
    deploy = reparameterize(model)
    assert isinstance(model[0], RefConv) and type(deploy[0]) is nn.Conv2d
    assert deploy.training and deploy[0].training and not deploy[1].training
    same = reparameterize(model, inplace=True)
    assert same is model and type(model[0]) is nn.Conv2d
    assert type(reparameterize(RefConv(3, 4, 3))) is nn.Conv2d


@pytest.mark.parametrize("kind", ["refconv", "drconv", "acconv"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_kernel_is_refused_naming_the_layer(kind: str, bad: float) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 3)))
    with torch.no_grad():
        model[1][0].weight[0, 0, 1, 1] = bad
    with pytest.raises(ValueError, match=r"cannot convert '1\.0' .* weight holds NaN or inf"):
        convert(model, kind)
    assert type(model[0]) is nn.Conv2d and type(model[1][0]) is nn.Conv2d  # all or nothing
