"""The conv-method protocol: a third method (ACConv) and a user's own class go through every walker.

convert, the trainable regimes, profile, reparameterize, deploy checkpoints, export and the CLI
all ask the layer (``refvision.nn.ConvMethod``); nothing outside the method's file knows it. The
fold is named ``fuse`` so timm's ``reparameterize_model`` folds refvision models, and
``refvision.reparameterize`` folds timm's own re-parameterizable blocks.
"""

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from user_conv import RepBranchConv

from refvision import convert, profile, reparameterize
from refvision.app.cli import lightning_cli
from refvision.app.demo.data import write_imagefolder
from refvision.export.formats import export_checkpoint
from refvision.nn import ACConv, ConvMethod, get_method, register_method, registered_methods
from refvision.surgery.convert import converted_layers
from refvision.surgery.trainable import set_trainable
from refvision.tasks.conv_config import conv_method


def _perturb(model: nn.Module) -> None:
    """Give every method parameter non-zero values, as training would."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in converted_layers(model):
            for _, param in layer.method_parameters():
                param.copy_(0.1 * torch.randn(param.shape, generator=gen, dtype=param.dtype))


def test_registry_names_built_ins_and_resolves_class_paths() -> None:
    assert {"refconv", "drconv", "acconv"} <= set(registered_methods())
    assert get_method("acconv") is ACConv
    assert get_method("user_conv.RepBranchConv") is RepBranchConv
    registered = ", ".join(sorted(registered_methods()))
    with pytest.raises(ValueError, match=f"'nope' is unknown; registered: {registered},"):
        get_method("nope")
    with pytest.raises(ValueError, match="not a refvision.nn.ConvMethod subclass"):
        get_method("torch.nn.Conv2d")
    with pytest.raises(ValueError, match="cannot import"):
        get_method("no_such_module.Conv")

    class Clash(ConvMethod):
        kind = "refconv"

    with pytest.raises(ValueError, match="already taken"):
        register_method(Clash)


def test_acconv_equals_three_branch_convs_float64_and_folds_exactly() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dtype=torch.float64)
    layer = ACConv.from_conv(conv, init="default")
    x = torch.randn(2, 4, 11, 9, dtype=torch.float64)
    # Independent reference: the ACNet block as three convs whose outputs are summed.
    expected = (
        F.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)
        + F.conv2d(x, layer.hor_weight, stride=2, padding=(0, 1))
        + F.conv2d(x, layer.ver_weight, stride=2, padding=(1, 0))
    )
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    fused = layer.fuse()
    assert type(fused) is nn.Conv2d
    torch.testing.assert_close(fused(x), expected, rtol=1e-12, atol=1e-12)
    # zeros init (the default) starts as the replaced conv.
    torch.testing.assert_close(ACConv.from_conv(conv)(x), conv(x), rtol=0, atol=0)
    assert not ACConv.accepts(nn.Conv2d(3, 3, 1)) and not ACConv.accepts(nn.Conv2d(3, 3, (3, 2)))


@pytest.mark.parametrize("kind", ["acconv", "user_conv.RepBranchConv"])
def test_every_walker_on_a_torchvision_model(kind: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=5).eval()
    vanilla_params = profile(model, (1, 3, 32, 32)).params_total
    convert(model, kind, select="kxk")
    layers = converted_layers(model)
    assert layers and all(type(layer) is get_method(kind) for _, layer in layers)
    _perturb(model)

    set_trainable(model, "refocus_only")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    added = {f"{name}.{p}" for name, layer in layers for p, _ in layer.method_parameters()}
    assert trainable == added and added
    set_trainable(model, "all_but_basis")
    assert not any(layer.weight.requires_grad for _, layer in layers)
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.endswith(".weight") or n in added)

    train = profile(model, (1, 3, 32, 32))
    assert train.params_training_only == sum(p.numel() for _, layer in layers for _, p in layer.method_parameters())
    assert train.params_total - train.params_training_only == vanilla_params

    x = torch.randn(2, 3, 32, 32)
    deploy = reparameterize(model)
    assert not converted_layers(deploy) and converted_layers(model)
    torch.testing.assert_close(deploy(x), model(x), rtol=1e-5, atol=1e-5)
    torchvision.models.mobilenet_v2(num_classes=5).load_state_dict(deploy.state_dict(), strict=True)
    assert profile(deploy, (1, 3, 32, 32)).params_total == vanilla_params


def test_timm_folds_refvision_models() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    convert(model, "refconv", select="kxk", include="layer1.*")
    convert(model, "acconv", select="kxk", include="layer2.*")
    _perturb(model)
    x = torch.randn(2, 3, 32, 32)
    ours, theirs = reparameterize(model), timm.utils.reparameterize_model(model)
    assert not converted_layers(theirs)
    assert torch.equal(ours(x), theirs(x))
    torch.testing.assert_close(theirs(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mobileone_s0", "repvgg_a0", "fastvit_t8"])
def test_refvision_folds_timm_blocks(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=4).eval()
    with torch.no_grad():  # non-trivial BN statistics, so that folding them is tested
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    folded = reparameterize(model)
    reference = timm.utils.reparameterize_model(model)
    assert sum(p.numel() for p in folded.parameters()) < sum(p.numel() for p in model.parameters())
    assert torch.equal(folded(x), reference(x))
    torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-4)


def test_refvision_folds_its_methods_and_timm_blocks_in_one_model() -> None:
    torch.manual_seed(0)
    model = timm.create_model("mobileone_s0", pretrained=False, num_classes=4).eval()
    convert(model, "refconv", select="kxk", include="stem.*")
    _perturb(model)
    x = torch.randn(1, 3, 64, 64)
    folded = reparameterize(model)
    assert not converted_layers(folded)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("data") / "images", train_per_class=4, val_per_class=2, size=32)


def _cli_args(images: Path, root: Path) -> list[str]:
    return [
        "-c",
        "configs/demo/classification.yaml",
        "--data.root",
        str(images),
        "--data.image_size",
        "32",
        "--data.resize_size",
        "32",
        "--data.batch_size",
        "8",
        "--model.backbone",
        "mobilenet_v2",
        "--model.image_size",
        "32",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(root),
    ]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, images: Path) -> str:
    cli = lightning_cli(["fit", *_cli_args(images, tmp_path_factory.mktemp("base"))])
    return cli.trainer.checkpoint_callback.best_model_path


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["acconv", "user_conv.RepBranchConv"])
def test_cli_fit_deploy_checkpoint_and_export(tmp_path: Path, images: Path, baseline: str, kind: str) -> None:
    options = "{init: default}" if kind == "acconv" else "{scale: 0.05}"
    cli = lightning_cli(
        [
            "fit",
            *_cli_args(images, tmp_path / "method"),
            "--model.init_from",
            baseline,
            "--model.conv.kind",
            kind,
            "--model.conv.options",
            options,
        ]
    )
    assert converted_layers(cli.model)
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    deploy = best.with_name("best-deploy.ckpt")
    state = torch.load(deploy, map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["conv"] == {"kind": "none"}
    vanilla = torchvision.models.mobilenet_v2(num_classes=4)
    vanilla.load_state_dict({k.removeprefix("model."): v for k, v in state["state_dict"].items()}, strict=True)
    report = export_checkpoint(str(best), tmp_path / "model.pt", "torchscript")
    assert report.fold_max_abs_diff is not None and report.fold_max_abs_diff < 1e-4
    assert (tmp_path / "model.pt").is_file()


EVERY_METHOD = [*sorted(registered_methods()), "user_conv.RepBranchConv"]


@pytest.mark.parametrize("kind", EVERY_METHOD)
def test_from_conv_copies_all_of_the_conv(kind: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, padding_mode="reflect", dtype=torch.float64).eval()
    # A padding patched after construction: reflect padding still applies the one fixed at construction.
    conv.padding = (2, 2)
    conv.weight.requires_grad_(False)
    conv.bias.requires_grad_(False)
    layer = get_method(kind).from_conv(conv)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(layer, attr) == getattr(conv, attr), attr
    assert layer.padding_mode == "reflect" and not layer.training
    assert list(layer._reversed_padding_repeated_twice) == list(conv._reversed_padding_repeated_twice) == [1] * 4
    assert torch.equal(layer.bias, conv.bias) and not layer.bias.requires_grad
    assert torch.equal(layer.weight, conv.weight)
    assert not layer.weight.requires_grad
    assert all(t.dtype == torch.float64 for t in (*layer.parameters(), *layer.buffers()))


class _Untyped(ConvMethod):
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, size=3) -> ConvMethod:  # noqa: ANN001
        return cls.replacing(conv)


class _Clashing(ConvMethod):
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, select: int = 3) -> ConvMethod:
        return cls.replacing(conv)


def test_model_conv_options_are_the_methods_declared_options() -> None:
    user = "user_conv.RepBranchConv"
    assert conv_method({"kind": "refconv", "select": "kxk", "map_k": 3, "init": "default"}) == (
        get_method("refconv"),
        {"map_k": 3, "init": "default"},
    )
    assert conv_method({"kind": user, "scale": 0.5}) == (RepBranchConv, {"scale": 0.5})
    assert conv_method({"kind": user, "options": {"scale": 1}}) == (RepBranchConv, {"scale": 1})
    refconv_options = "map_k: int = 3, map_groups: int | None = None, init: 'default' | 'zeros' = 'default'"
    cases = [
        (
            {"kind": "refconv", "regions": 8},
            f"model.conv.regions: conv kind 'refconv' has no option 'regions'; its options: {refconv_options}",
        ),
        (
            {"kind": "drconv", "regions": "8"},
            "model.conv.regions: conv kind 'drconv' expects int, got '8'; its options: regions: int = 8, "
            "residual: bool = True",
        ),
        (
            {"kind": "acconv", "init": "ones"},
            "model.conv.init: conv kind 'acconv' expects 'zeros' | 'default', got 'ones'; its options: "
            "init: 'zeros' | 'default' = 'zeros'",
        ),
        (
            {"kind": user, "scale": True},
            "model.conv.scale: conv kind 'user_conv.RepBranchConv' expects float, got True; its options: "
            "scale: float = 0.0",
        ),
        (
            {"kind": user, "scale": 1.0, "options": {"scale": 2.0}},
            "model.conv: scale given both beside kind and under options; give each once",
        ),
        (
            {"kind": "refconv", "select": 3},
            "model.conv.select: the conv selection expects 'depthwise' | 'kxk' | 'pointwise' | 'all', got 3",
        ),
        (
            {"kind": f"{__name__}._Untyped"},
            f"model.conv.kind: {__name__}._Untyped.from_conv: option 'size' has no type annotation",
        ),
        (
            {"kind": f"{__name__}._Clashing"},
            f"model.conv.kind: '{__name__}._Clashing' declares option(s) select, which model.conv uses itself",
        ),
    ]
    for conv, message in cases:
        with pytest.raises(ValueError) as err:
            conv_method(conv)
        assert str(err.value).startswith(message), (conv, str(err.value))


def test_the_options_table_in_docs_matches_the_declarations() -> None:
    rows = {}
    for line in (Path(__file__).parents[1] / "docs" / "methods.md").read_text().splitlines():
        if line.startswith("| `") and line.count("` |") >= 1:
            kind, _, options = line.strip("| ").partition(" | ")
            rows[kind.strip("`")] = options.replace("\\|", "|")
    assert rows and set(rows) <= set(registered_methods())
    for kind, options in rows.items():
        assert options == ", ".join(f"`{option}`" for option in get_method(kind).options().values()), kind
