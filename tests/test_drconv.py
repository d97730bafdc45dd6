"""DRConv against an independent dense reference, its gradient rule, deploy form and export."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from drconv_reference import dense_drconv, softmax_rule
from torch import Tensor, nn

from refvision.nn.drconv import DRConv, DRConvDeploy, drconv2d, eager, function
from refvision.nn.drconv.layouts import TiledLayout


@pytest.fixture(autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny shapes: on a busy machine, waking extra threads costs more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# (in, out, kernel, stride, padding, dilation, batch, regions, (H, W), bias, padding_mode)
CASES = [
    pytest.param(3, 5, 1, 1, 0, 1, 2, 4, (6, 5), True, "zeros", id="k1-cin!=cout-m4"),
    pytest.param(4, 4, 3, 1, 1, 1, 3, 8, (7, 7), True, "zeros", id="k3-pad1-m8"),
    pytest.param(3, 6, 3, 2, 1, 1, 2, 2, (9, 8), False, "zeros", id="k3-stride2-m2-nobias"),
    pytest.param(4, 3, 3, 1, 2, 2, 2, 4, (8, 8), True, "zeros", id="k3-dilation2-m4"),
    pytest.param(2, 5, 3, 2, 0, 2, 3, 8, (11, 9), True, "zeros", id="k3-stride2-dil2-m8"),
    pytest.param(3, 4, 3, 1, 1, 1, 2, 4, (6, 7), True, "reflect", id="k3-reflect-m4"),
]


def randomized_drconv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    regions: int,
    dtype: torch.dtype = torch.float64,
    residual: bool = True,
    **conv_kwargs,
) -> DRConv:
    """A DRConv whose generator output layer is randomized, so regions differ."""
    conv = DRConv(
        in_channels,
        out_channels,
        kernel_size,
        regions=regions,
        dtype=dtype,
        residual=residual,
        **conv_kwargs,
    )
    with torch.no_grad():
        conv.generator.expand_weight.normal_(0.0, 0.5)
        conv.generator.expand_bias.normal_(0.0, 0.1)
    return conv


def use_layout(monkeypatch: pytest.MonkeyPatch, layout: str, device: str = "cpu") -> None:
    """Run the region conv one way: ``grouped`` (eager CPU's default), ``grouped-chunked`` (one
    sample per chunk, in the layer and in the layout), ``tiled`` (CUDA's and exported graphs').
    CUDA always runs the tiled layout (``_region_layout``), so the others are skipped there."""
    if device == "cuda" and layout != "tiled":
        pytest.skip("CUDA runs the tiled layout only")
    if layout == "tiled":
        monkeypatch.setattr(function, "region_layout", TiledLayout)
    elif layout == "grouped-chunked":
        monkeypatch.setattr(eager, "CHUNK_BYTES", 1)
    else:
        assert layout == "grouped"


LAYOUTS = ["grouped", "grouped-chunked", "tiled"]


def all_grads(out: Tensor, grad_out: Tensor, x: Tensor, module: nn.Module) -> dict[str, Tensor]:
    names, params = zip(*module.named_parameters())
    grads = torch.autograd.grad(out, (x, *params), grad_out)
    return dict(zip(("input", *names), grads))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "paper"])
@pytest.mark.parametrize("cin, cout, k, stride, padding, dilation, batch, regions, size, bias, padding_mode", CASES)
def test_matches_dense_reference(
    monkeypatch: pytest.MonkeyPatch,
    device: str,
    layout: str,
    residual: bool,
    cin: int,
    cout: int,
    k: int,
    stride: int,
    padding: int,
    dilation: int,
    batch: int,
    regions: int,
    size: tuple[int, int],
    bias: bool,
    padding_mode: str,
) -> None:
    use_layout(monkeypatch, layout, device)
    torch.manual_seed(0)
    conv = randomized_drconv(
        cin,
        cout,
        k,
        regions=regions,
        stride=stride,
        padding=padding,
        dilation=dilation,
        bias=bias,
        padding_mode=padding_mode,
        residual=residual,
        device=device,
    )
    x = torch.randn(batch, cin, *size, dtype=torch.float64, device=device, requires_grad=True)

    reference = dense_drconv(conv, x)
    used = reference.guide.argmax(1).unique().numel()
    assert used >= min(regions, 3), f"only {used} of {regions} regions used; the test is weak"

    out = conv(x)
    torch.testing.assert_close(out, reference.out)
    with torch.no_grad():
        torch.testing.assert_close(conv.eval()(x), reference.out)
        torch.testing.assert_close(conv.fuse()(x), reference.out)
    conv.train()

    grad_out = torch.randn_like(out)
    got = all_grads(out, grad_out, x, conv)
    expected = all_grads(reference.out, grad_out, x, conv)
    assert set(got) == {
        "input",
        *(["weight"] if residual else []),
        *(["bias"] if bias else []),
        "guide_weight",
        "guide_bias",
        "generator.reduce_weight",
        "generator.reduce_bias",
        "generator.expand_weight",
        "generator.expand_bias",
    }
    for name in got:
        assert expected[name].abs().sum() > 0, f"reference gradient of {name} is zero"
        torch.testing.assert_close(got[name], expected[name], msg=f"gradient of {name}")


@pytest.mark.parametrize(
    "form, layout",
    [*[(form, layout) for form in ("residual", "paper") for layout in LAYOUTS], ("deploy", "tiled")],
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_inplace_op_after_drconv_trains_as_out_of_place(
    monkeypatch: pytest.MonkeyPatch, device: str, form: str, layout: str, bias: bool
) -> None:
    """An in-place op may follow every form in training (``nn.ReLU(inplace=True)`` after each conv
    of SSD300-VGG16's backbone): forward and backward equal an out-of-place ReLU's, and the output
    keeps channels-last strides. The deploy form with autograd recording runs the tiled layout's ops."""
    use_layout(monkeypatch, layout, device)
    torch.manual_seed(13)
    conv = randomized_drconv(4, 6, 3, regions=4, padding=1, bias=bias, residual=form != "paper", device=device)
    if form == "deploy":
        conv = conv.fuse()
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, device=device, requires_grad=True)
    grad_out = torch.randn(2, 6, 7, 6, dtype=torch.float64, device=device)

    names, params = zip(*conv.named_parameters())

    def relu_grads(inplace: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
        out = nn.ReLU(inplace=inplace)(conv(x))
        return out, torch.autograd.grad(out, (x, *params), grad_out, materialize_grads=True)

    out = conv(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    expected_out, expected = relu_grads(inplace=False)
    got_out, got = relu_grads(inplace=True)
    assert 0 < torch.count_nonzero(got_out) < got_out.numel()
    torch.testing.assert_close(got_out, expected_out, rtol=0, atol=0)
    for name, got_grad, expected_grad in zip(("input", *names), got, expected):
        # The deploy form has no gradient rule for the guide (argmax), the residual form none at step 0.
        assert expected_grad.abs().sum() > 0 or name.startswith("guide"), f"gradient of {name} is zero"
        torch.testing.assert_close(got_grad, expected_grad, rtol=0, atol=0, msg=f"gradient of {name}")


def test_straight_through_reference_gives_softmax_rule() -> None:
    torch.manual_seed(1)
    conv = randomized_drconv(3, 4, 3, regions=4, padding=1)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    reference = dense_drconv(conv, x)
    grad_out = torch.randn_like(reference.out)
    reference.out.backward(grad_out)

    expected = softmax_rule(reference.guide.detach(), reference.responses.detach(), grad_out)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(reference.guide.grad, expected)


def _function_inputs(
    batch: int, cin: int, cout: int, k: int, regions: int, out_size: tuple[int, int], device: str = "cpu"
) -> dict[str, Tensor]:
    double = {"dtype": torch.float64, "device": device}
    return {
        "weight": torch.randn(cout, cin, k, k, **double, requires_grad=True),
        "bias": torch.randn(cout, **double, requires_grad=True),
        "dynamic": torch.randn(batch, regions, cout, cin, k, k, **double, requires_grad=True),
        "guide": torch.randn(batch, regions, *out_size, **double),
    }


@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 0, 2)])
def test_gradcheck_function(device: str, stride: int, padding: int, dilation: int) -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 2, 8, 7, dtype=torch.float64, device=device, requires_grad=True)
    probe = torch.zeros(1, 2, 3, 3, dtype=torch.float64, device=device)
    out_size = F.conv2d(x, probe, None, stride, padding, dilation).shape[-2:]
    t = _function_inputs(2, 2, 3, 3, 3, tuple(out_size), device)

    def fn(x: Tensor, weight: Tensor, bias: Tensor, dynamic: Tensor) -> Tensor:
        return drconv2d(x, weight, bias, dynamic, t["guide"], stride, padding, dilation)

    assert torch.autograd.gradcheck(fn, (x, t["weight"], t["bias"], t["dynamic"]))


def test_function_guide_gradient_is_softmax_rule(device: str) -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, device=device)
    t = _function_inputs(2, 3, 4, 3, 5, (5, 6), device)
    guide = t["guide"].requires_grad_()
    out = drconv2d(x, t["weight"], t["bias"], t["dynamic"], guide, padding=1)
    grad_out = torch.randn_like(out)
    (grad_guide,) = torch.autograd.grad(out, guide, grad_out)

    responses = torch.stack(
        [
            F.conv2d(x[b : b + 1], t["weight"] + t["dynamic"][b, j], t["bias"], padding=1)[0]
            for b in range(2)
            for j in range(5)
        ]
    ).view(2, 5, 4, 5, 6)
    expected = softmax_rule(guide.detach(), responses.detach(), grad_out)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(grad_guide, expected)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k, padding", [(3, 1), (1, 0)], ids=["k3", "k1"])
def test_region_filter_gets_gradient_only_from_its_pixels(
    monkeypatch: pytest.MonkeyPatch, device: str, layout: str, k: int, padding: int
) -> None:
    use_layout(monkeypatch, layout, device)
    torch.manual_seed(4)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, device=device, requires_grad=True)
    t = _function_inputs(2, 3, 4, k, 4, (6, 6), device)
    guide = t["guide"]
    guide[:, 3] -= 100.0  # region 3 is never the argmax
    guide[1, 0] -= 100.0  # sample 1 never uses region 0
    out = drconv2d(x, t["weight"], t["bias"], t["dynamic"], guide, padding=padding)
    grad_out = torch.randn_like(out)
    grad_x, grad_dynamic = torch.autograd.grad(out, (x, t["dynamic"]), grad_out)
    region = guide.argmax(1, keepdim=True)
    filters = (t["weight"] + t["dynamic"]).detach()
    expected_x = (
        torch.stack(
            [
                torch.nn.grad.conv2d_input(
                    (1, *x.shape[1:]), filters[b, j], (grad_out * (region == j))[b : b + 1], padding=padding
                )[0]
                for b in range(2)
                for j in range(4)
            ]
        )
        .view(2, 4, *x.shape[1:])
        .sum(1)
    )
    torch.testing.assert_close(grad_x, expected_x)

    assert torch.count_nonzero(grad_dynamic[:, 3]) == 0
    assert torch.count_nonzero(grad_dynamic[1, 0]) == 0
    for b, j in [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2)]:
        assigned = (grad_out * (region == j))[b : b + 1]
        expected = torch.nn.grad.conv2d_weight(x[b : b + 1].detach(), (4, 3, k, k), assigned, padding=padding)
        assert expected.abs().sum() > 0, f"region {j} of sample {b} has no pixels"
        torch.testing.assert_close(grad_dynamic[b, j], expected)


@pytest.mark.parametrize(
    "conv",
    [
        pytest.param(nn.Conv2d(5, 7, 1, bias=False), id="k1"),
        pytest.param(nn.Conv2d(4, 6, 3, stride=2, padding=1), id="k3-stride2-pad1"),
        pytest.param(nn.Conv2d(4, 4, 3, padding=2, dilation=2, padding_mode="reflect"), id="k3-reflect"),
    ],
)
def test_from_conv_is_function_preserving_until_trained(conv: nn.Conv2d) -> None:
    torch.manual_seed(5)
    drconv = DRConv.from_conv(conv, regions=4)
    x = torch.randn(2, conv.in_channels, 9, 10)
    torch.testing.assert_close(drconv(x), conv(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(drconv.state_dict()["weight"], conv.weight)

    optimizer = torch.optim.SGD(drconv.parameters(), lr=0.1)
    drconv(x).square().mean().backward()
    optimizer.step()
    with torch.no_grad():
        assert not torch.allclose(drconv(x), conv(x), atol=1e-4)


def test_geometry_changed_after_construction_is_honoured() -> None:
    torch.manual_seed(6)
    conv = randomized_drconv(3, 4, 3, regions=4, padding=1)
    conv.stride, conv.dilation, conv.padding = (2, 2), (2, 2), (2, 2)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    out = conv(x)
    assert out.shape == F.conv2d(x, conv.weight, stride=2, padding=2, dilation=2).shape
    torch.testing.assert_close(out, dense_drconv(conv, x).out)


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "paper"])
def test_deploy_matches_eval_and_exports(tmp_path, device: str, residual: bool) -> None:
    """float32 (IEEE on CUDA too, see the ``device`` fixture): 1e-5, ONNX Runtime 1e-4. ONNX runs
    on onnxruntime's CUDA provider where it is installed, else the CUDA model's export runs on CPU."""
    import onnxruntime

    torch.manual_seed(7)
    conv = randomized_drconv(4, 6, 3, regions=4, dtype=torch.float32, padding=1, residual=residual, device=device)
    conv.eval()
    x = torch.randn(2, 4, 10, 9, device=device)
    deploy = conv.fuse().eval()
    assert isinstance(deploy, DRConvDeploy)
    assert deploy.state_dict().keys() == conv.state_dict().keys()
    with torch.no_grad():
        expected = dense_drconv(conv, x).out
        torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(deploy(x), expected, rtol=1e-5, atol=1e-5)

    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(deploy, (x,), dynamic_shapes=({0: batch},))
    torch.testing.assert_close(exported.module()(x), expected, rtol=1e-5, atol=1e-5)

    path = tmp_path / "drconv.onnx"
    torch.onnx.export(deploy, (x,), path, dynamo=True, dynamic_shapes=({0: batch},))
    cuda_provider = device == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    provider = "CUDAExecutionProvider" if cuda_provider else "CPUExecutionProvider"
    session = onnxruntime.InferenceSession(str(path), providers=[provider])
    x3 = torch.randn(3, 4, 10, 9, device=device)
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x3.cpu().numpy()})
    with torch.no_grad():
        expected = dense_drconv(conv, x3).out.cpu()
    torch.testing.assert_close(torch.from_numpy(onnx_out), expected, rtol=1e-4, atol=1e-4)


def test_autocast_bf16_forward_backward(device: str) -> None:
    torch.manual_seed(8)
    conv = randomized_drconv(4, 6, 3, regions=4, dtype=torch.float32, padding=1, device=device)
    with torch.no_grad():
        conv.generator.expand_weight.mul_(0.1)
    x = torch.randn(2, 4, 8, 8, device=device, requires_grad=True)
    reference = conv(x).detach()
    with torch.autocast(device, dtype=torch.bfloat16):
        out = conv(x)
    out.float().square().mean().backward()

    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in conv.parameters())
    error = (out.float() - reference).norm() / reference.norm()
    assert error < 0.05, f"bf16 output relative error {error:.3f}"


def test_groups_other_than_one_raise() -> None:
    with pytest.raises(ValueError, match="groups=2"):
        DRConv(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="groups=4"):
        DRConv.from_conv(nn.Conv2d(4, 4, 3, groups=4))


def test_no_conv2d_children_and_repr() -> None:
    conv = DRConv(4, 6, 3, regions=5)
    assert [m for m in conv.modules() if isinstance(m, nn.Conv2d)] == [conv]
    assert "regions=5" in repr(conv)
    assert conv.guide_weight.shape == (5, 4, 3, 3)
    assert conv.generator(torch.randn(2, 4, 7, 7)).shape == (2, 5, 6, 4, 3, 3)


def test_device_matches_reference_and_runs_under_fp16_autocast(device: str) -> None:
    torch.manual_seed(9)
    conv = randomized_drconv(4, 5, 3, regions=8, padding=1, stride=2).to(device)
    x = torch.randn(3, 4, 12, 11, dtype=torch.float64, device=device, requires_grad=True)
    out = conv(x)
    reference = dense_drconv(conv, x)
    torch.testing.assert_close(out, reference.out)
    grad_out = torch.randn_like(out)
    got = all_grads(out, grad_out, x, conv)
    expected = all_grads(reference.out, grad_out, x, conv)
    for name in got:
        torch.testing.assert_close(got[name], expected[name], msg=f"gradient of {name}")

    conv = conv.float()
    with torch.autocast(device, dtype=torch.float16):
        out = conv(x.detach().float())
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())


def test_paper_form_has_no_static_kernel_and_learns_guide_at_step_zero() -> None:
    torch.manual_seed(10)
    plain = nn.Conv2d(4, 6, 3, padding=1)
    conv = DRConv.from_conv(plain, regions=4, residual=False)
    assert conv.weight is None and "weight" not in conv.state_dict()
    assert "residual=False" in repr(conv)
    torch.testing.assert_close(conv.bias, plain.bias)
    x = torch.randn(2, 4, 8, 8)
    out = conv(x)
    reference = dense_drconv(conv, x).out
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    out.square().mean().backward()
    for name, param in conv.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{name} has no gradient"

    deploy = conv.fuse().eval()
    assert deploy.state_dict().keys() == conv.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), conv.eval()(x), rtol=1e-5, atol=1e-5)
        exported = torch.export.export(deploy, (x,))
        torch.testing.assert_close(exported.module()(x), deploy(x), rtol=1e-5, atol=1e-5)
        traced = torch.jit.trace(deploy, (x,), check_trace=False)
        torch.testing.assert_close(traced(x), deploy(x), rtol=1e-5, atol=1e-5)
    restored = DRConv(4, 6, 3, padding=1, regions=4, residual=False)
    restored.load_state_dict(conv.state_dict())


def test_residual_variant_guide_gradient_is_exactly_zero_at_step_zero() -> None:
    torch.manual_seed(11)
    conv = DRConv.from_conv(nn.Conv2d(3, 4, 3, padding=1), regions=4)
    conv(torch.randn(2, 3, 6, 6)).square().mean().backward()
    assert torch.count_nonzero(conv.guide_weight.grad) == 0
    assert conv.generator.expand_weight.grad.abs().sum() > 0


def test_inference_path_computes_one_conv_of_rows() -> None:
    """Deploy form, counted with torch's FLOP counter on the real ops, never m dense convs.

    Eager on CPU: exactly one conv's multiply-adds (one GEMM per (sample, region) group). With
    autograd recording (as in a traced or exported graph, and on CUDA): the tiled GEMM over
    B * (tiles * T) rows, at most m * T padding rows per sample (region_conv_macs)."""
    from torch.utils.flop_counter import FlopCounterMode

    from refvision.nn.drconv import region_conv_macs, tile_rows

    torch.manual_seed(12)
    conv = randomized_drconv(8, 8, 3, regions=8, dtype=torch.float32, padding=1).eval()
    deploy = conv.fuse()
    x = torch.randn(2, 8, 16, 16)
    generator = 8 * (2 * 3 * 3) * 8 * (8 * 8)  # expand layer: m groups of (B*kh*kw, m) @ (m, Cout*Cin)
    one_conv = 2 * (16 * 16) * 8 * 72

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        eager = deploy(x)
    counts = counter.get_flop_counts()["Global"]
    assert counts[torch.ops.aten.bmm] // 2 == generator
    gemms = counts.get(torch.ops.aten.mm, 0) + counts.get(torch.ops.aten.addmm, 0)  # addmm: with bias
    assert gemms // 2 == one_conv

    with FlopCounterMode(display=False) as counter:
        tiled = deploy(x)
    bmm = counter.get_flop_counts()["Global"][torch.ops.aten.bmm] // 2 - generator
    padding_bound = 2 * 8 * tile_rows(16 * 16, 8) * 8 * 72
    assert bmm == region_conv_macs(2, 8, (16, 16), 8, 72)
    assert one_conv <= bmm <= one_conv + padding_bound < 8 * one_conv
    torch.testing.assert_close(tiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_batch_gives_empty_outputs_and_gradients(
    monkeypatch: pytest.MonkeyPatch, device: str, layout: str
) -> None:
    """As nn.Conv2d: a batch of 0 samples is a valid input, in training, eval and the deploy form."""
    use_layout(monkeypatch, layout, device)
    conv = randomized_drconv(4, 6, 3, regions=4, padding=1, device=device)
    plain = nn.Conv2d(4, 6, 3, padding=1, dtype=torch.float64, device=device)
    x = torch.randn(0, 4, 7, 5, dtype=torch.float64, device=device, requires_grad=True)
    out = conv(x)
    assert out.shape == plain(x).shape == (0, 6, 7, 5)
    out.sum().backward()
    assert x.grad.shape == x.shape and conv.guide_weight.grad.abs().sum() == 0
    with torch.no_grad():
        assert conv.eval()(x).shape == conv.fuse()(x).shape == (0, 6, 7, 5)
