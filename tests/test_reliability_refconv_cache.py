"""RefConv in eval mode after its weights change in every way training code changes them.

The layer once cached ``Wt`` in eval mode, keyed on tensor version counters; an in-place edit
through ``.data`` (what EMA and weight-averaging code does) bumps no version counter, so the
cached kernel went stale. Each test changes the weights for real, then checks the eval-mode,
no-grad output bit for bit against a fresh computation and against the float64 reference.
"""

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from test_refconv import reference_refocus
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from refvision.nn.refconv import RefConv


def _layer() -> RefConv:
    torch.manual_seed(0)
    return RefConv(4, 4, 3, padding=1, groups=4).eval()


def _fresh(layer: RefConv, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, layer.refocused_weight(), layer.bias, 1, 1, 1, layer.groups)


def _reference(layer: RefConv, x: torch.Tensor) -> torch.Tensor:
    weight = reference_refocus(layer.weight, layer.refocus_weight, layer.map_groups)
    return F.conv2d(x.double(), weight, layer.bias.double(), 1, 1, 1, layer.groups)


def _data_add_refocus(layer: RefConv) -> None:
    layer.refocus_weight.data.add_(0.5)


def _data_add_basis(layer: RefConv) -> None:
    layer.weight.data.mul_(2.0)


def _data_assign(layer: RefConv) -> None:
    layer.refocus_weight.data = torch.randn_like(layer.refocus_weight)


def _copy_under_no_grad(layer: RefConv) -> None:
    with torch.no_grad():
        layer.refocus_weight.copy_(torch.randn_like(layer.refocus_weight))
        layer.weight.copy_(torch.randn_like(layer.weight))


def _load_state_dict(layer: RefConv) -> None:
    layer.load_state_dict({key: value + 0.25 for key, value in layer.state_dict().items()})


def _optimizer_step(layer: RefConv) -> None:
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5, momentum=0.9)
    layer.train()
    for _ in range(2):
        optimizer.zero_grad()
        layer(torch.randn(2, 4, 6, 6)).square().mean().backward()
        optimizer.step()
    layer.eval()


def _round_trip_half(layer: RefConv) -> None:
    layer.half().float()


CHANGES: dict[str, Callable[[RefConv], None]] = {
    "data_inplace_refocus": _data_add_refocus,
    "data_inplace_basis": _data_add_basis,
    "data_assignment": _data_assign,
    "copy_under_no_grad": _copy_under_no_grad,
    "load_state_dict": _load_state_dict,
    "optimizer_step": _optimizer_step,
    "half_float_round_trip": _round_trip_half,
}


def test_data_edits_bump_no_version_counter() -> None:
    # The fact that made a version-keyed cache wrong: keep it checked against this torch.
    layer = _layer()
    before = (layer.refocus_weight._version, layer.weight._version)
    layer.refocus_weight.data.add_(1.0)
    layer.weight.data.add_(1.0)
    assert (layer.refocus_weight._version, layer.weight._version) == before


@pytest.mark.parametrize("change", list(CHANGES))
def test_eval_output_follows_every_weight_change(change: str) -> None:
    layer = _layer()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        before = layer(x)
    CHANGES[change](layer)
    with torch.no_grad():
        after = layer(x)
        assert torch.equal(after, _fresh(layer, x))
        torch.testing.assert_close(after.double(), _reference(layer, x), rtol=1e-5, atol=1e-5)
    if change != "half_float_round_trip":
        assert (after - before).abs().max() > 1e-2  # the change was real
    with torch.inference_mode():
        assert torch.equal(layer(x), after)


def test_ema_of_a_refconv_model_evaluates_its_averaged_weights() -> None:
    # AveragedModel updates its copy in place under no_grad (lerp_ / copy_ on detached tensors).
    model = torch.nn.Sequential(RefConv(4, 4, 3, padding=1, groups=4), torch.nn.ReLU())
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    ema.eval()
    x = torch.randn(2, 4, 6, 6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    outputs = []
    for _ in range(3):
        with torch.no_grad():
            outputs.append(ema(x))
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
        ema.update_parameters(model)
    with torch.no_grad():
        final = ema(x)
        assert torch.equal(final, F.relu(_fresh(ema.module[0], x)))
    assert (final - outputs[-1]).abs().max() > 1e-3


def test_train_and_eval_forward_are_bit_identical() -> None:
    layer = _layer()
    x = torch.randn(2, 4, 6, 6)
    train_out = layer.train()(x)
    with torch.no_grad():
        eval_out = layer.eval()(x)
    assert torch.equal(train_out.detach(), eval_out)
