"""Divergence: a fit whose loss becomes NaN/inf stops; deploy and export refuse non-finite numbers."""

import re
import signal
from pathlib import Path

import pytest
import torch
from fit_process import fit_in_process, output_of, start_fit

from refvision.app.cli import main
from refvision.app.demo.data import write_imagefolder
from refvision.lifecycle.divergence import TrainingDiverged
from refvision.utils.atomic_file import is_temporary

REFCONV = ("-c", "configs/conv/refconv.yaml", "--allow_random_basis", "true")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("data") / "images", train_per_class=8, val_per_class=2, size=32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    """A RefConv train-form checkpoint from a real one-step fit (its deploy checkpoint lies beside it)."""
    cli = fit_in_process(
        tmp_path_factory.mktemp("fit"),
        data,
        *REFCONV,
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "1",
    )
    return Path(cli.trainer.checkpoint_callback.best_model_path)


def _with_weights(source: Path, target: Path, change) -> Path:
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    change(checkpoint["state_dict"])
    torch.save(checkpoint, target)
    return target


def _overflowing(state: dict[str, torch.Tensor]) -> None:
    # Finite weights whose logits overflow to inf, so train - deploy and exported - PyTorch are NaN.
    state["model.classifier.1.weight"].fill_(3e38)


def _nan_weight(state: dict[str, torch.Tensor]) -> None:
    state["model.classifier.1.bias"][0] = float("nan")


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.slow
def test_exploding_loss_stops_the_fit_and_writes_nothing(tmp_path: Path, data: Path) -> None:
    # Batches of 2, so the loss blows up within the first epoch, before any validation.
    proc = start_fit(
        tmp_path,
        data,
        *REFCONV,
        "--model.optim.name",
        "sgd",
        "--model.optim.lr",
        "1e6",
        "--model.optim.warmup_epochs",
        "0",
        "--trainer.max_epochs",
        "5",
        "--data.batch_size",
        "2",
        "--trainer.limit_train_batches",
        "16",
    )
    code = proc.wait(timeout=600)
    out = output_of(proc)
    assert code not in (0, -signal.SIGKILL), out
    assert re.search(
        r"refvision fit: error: the training loss is (nan|inf|-inf) at epoch \d+, step \d+ \(batch \d+\)", out
    ), out
    assert not list(tmp_path.rglob("*.ckpt")), out


def test_deploy_refuses_a_nan_gap(tmp_path: Path, trained: Path) -> None:
    source = _with_weights(trained, tmp_path / "overflow.ckpt", _overflowing)
    with pytest.raises(SystemExit, match=r"max \|output\(train\) - output\(deploy\)\| is nan"):
        main(["reparameterize", "--ckpt", str(source), "--output", str(tmp_path / "deploy.ckpt")])
    assert _files(tmp_path) == ["overflow.ckpt"]


def test_export_refuses_a_nan_gap(tmp_path: Path, trained: Path) -> None:
    # Train form: the fold gap is NaN. Deploy form (no fold): the exported-vs-PyTorch check is NaN.
    train_form = _with_weights(trained, tmp_path / "overflow.ckpt", _overflowing)
    with pytest.raises(SystemExit, match=r"max \|train - deploy\| is nan"):
        main(["export", "--ckpt", str(train_form), "--output", str(tmp_path / "a.pt"), "--format", "torchscript"])
    deploy_form = _with_weights(trained.with_name("best-deploy.ckpt"), tmp_path / "overflow-deploy.ckpt", _overflowing)
    with pytest.raises(SystemExit, match=r"torchscript check: max \|exported - PyTorch\| = nan"):
        main(["export", "--ckpt", str(deploy_form), "--output", str(tmp_path / "b.pt"), "--format", "torchscript"])
    assert _files(tmp_path) == ["overflow-deploy.ckpt", "overflow.ckpt"]


@pytest.mark.parametrize("command", ["reparameterize", "export"])
def test_non_finite_weights_are_refused(tmp_path: Path, trained: Path, command: str) -> None:
    source = _with_weights(trained, tmp_path / "nan.ckpt", _nan_weight)
    extra = ["--format", "torchscript"] if command == "export" else []
    with pytest.raises(SystemExit, match=r"holds non-finite weights \(model\.classifier\.1\.bias\)"):
        main([command, "--ckpt", str(source), "--output", str(tmp_path / "out.pt"), *extra])
    assert _files(tmp_path) == ["nan.ckpt"]
    assert not any(is_temporary(p) for p in tmp_path.iterdir())


def test_fit_from_non_finite_weights_stops_before_validation(tmp_path: Path, data: Path, trained: Path) -> None:
    source = _with_weights(trained.with_name("best-deploy.ckpt"), tmp_path / "nan.ckpt", _nan_weight)
    with pytest.raises(TrainingDiverged, match=r"non-finite weights at epoch 0, step 0: model\.classifier\.1\.bias"):
        fit_in_process(tmp_path / "run", data, *REFCONV, "--model.init_from", str(source))
    assert not list((tmp_path / "run").rglob("*.ckpt"))
