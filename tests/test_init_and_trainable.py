"""`init_from` loading, offline weight errors and the three `trainable` regimes."""

import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from refvision import DRConv, RefConv, convert
from refvision.checkpoints.loading import extract_state_dict, load_init_from
from refvision.models.weights import WeightsUnavailableError, explain_download_failure
from refvision.surgery.trainable import freeze_norm_statistics, set_trainable


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))


def test_lightning_checkpoint_prefix_is_stripped(tmp_path: Path) -> None:
    source = _net()
    path = tmp_path / "task.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    target = _net()
    load_init_from(target, str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value)


def test_prefix_picks_a_subtree() -> None:
    state = {"backbone.0.weight": torch.ones(1), "head.weight": torch.zeros(1)}
    assert extract_state_dict({"model": state}, prefix="backbone.") == {"0.weight": state["backbone.0.weight"]}
    with pytest.raises(ValueError, match="init_prefix='neck.'"):
        extract_state_dict(state, prefix="neck.")


def test_mismatch_names_the_keys_and_the_options(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save(nn.Sequential(nn.Conv2d(3, 16, 3)).state_dict(), path)
    with pytest.raises(
        ValueError,
        match=r"(?s)2 shape mismatches.*shape of 0\.weight: file \[16, 3, 3, 3\] vs model "
        r"\[8, 3, 3, 3\].*init_strict",
    ):
        load_init_from(_net(), str(path))
    with pytest.raises(FileNotFoundError, match="no-such.pth"):
        load_init_from(_net(), str(tmp_path / "no-such.pth"))


def test_non_strict_skips_other_shapes_and_reports_them(tmp_path: Path) -> None:
    source = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 10, 1))
    path = tmp_path / "ten-classes.pth"
    torch.save(source.state_dict(), path)
    target = _net()
    head = target[3].weight.clone()
    report = load_init_from(target, str(path), strict=False)
    assert [key for key, _, _ in report.mismatched] == ["3.weight", "3.bias"]
    assert torch.equal(target[0].weight, source[0].weight) and torch.equal(target[3].weight, head)


def test_non_strict_allows_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "partial.pth"
    source = _net()
    torch.save({k: v for k, v in source.state_dict().items() if k.startswith("0.")}, path)
    with pytest.raises(ValueError, match="missing"):
        load_init_from(_net(), str(path))
    target = _net()
    report = load_init_from(target, str(path), strict=False)
    assert torch.equal(target[0].weight, source[0].weight)
    assert report.loaded == ["0.weight", "0.bias"] and "1.running_mean" in report.missing


def test_offline_download_names_option_and_local_alternative() -> None:
    with pytest.raises(WeightsUnavailableError, match=r"model\.weights.*--model\.init_from"):
        with explain_download_failure("torchvision weights resnet18.DEFAULT", "model.weights"):
            raise urllib.error.URLError("Name or service not known")


def _mobilenet(kind: str) -> nn.Module:
    model = torchvision.models.mobilenet_v2(num_classes=3)
    return convert(
        model,
        kind,
        select="pointwise" if kind == "drconv" else "kxk",
        include=["features.1*"] if kind == "drconv" else None,
    )


def test_trainable_regimes_refconv() -> None:
    model = _mobilenet("refconv")
    refconvs = [m for m in model.modules() if isinstance(m, RefConv)]
    set_trainable(model, "all")
    assert all(p.requires_grad for p in model.parameters())
    assert all(not m.weight.requires_grad for m in refconvs)  # the basis is a frozen buffer
    set_trainable(model, "refocus_only")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(m.refocus_weight) for m in refconvs}


def test_trainable_regimes_drconv() -> None:
    model = _mobilenet("drconv")
    drconvs = [m for m in model.modules() if isinstance(m, DRConv)]
    assert drconvs
    set_trainable(model, "all_but_basis")
    assert all(not m.weight.requires_grad for m in drconvs)
    assert model.classifier[1].weight.requires_grad
    set_trainable(model, "refocus_only")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    added = {id(p) for m in drconvs for n, p in m.named_parameters() if n not in ("weight", "bias")}
    assert trainable == added and added


def test_refocus_only_needs_a_converted_model_and_modes_are_checked() -> None:
    with pytest.raises(ValueError, match="refocus_only.*needs converted convs"):
        set_trainable(_net(), "refocus_only")
    with pytest.raises(ValueError, match="trainable='some'.*all_but_basis"):
        set_trainable(_net(), "some")


def test_freeze_norm_statistics_keeps_running_stats() -> None:
    model = _net().train()
    freeze_norm_statistics(model)
    before = model[1].running_mean.clone()
    model(torch.randn(2, 3, 8, 8))
    assert torch.equal(model[1].running_mean, before)
    assert model[3].training
