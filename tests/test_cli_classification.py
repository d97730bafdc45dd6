"""The `refvision` command end to end on a tiny generated image folder."""

import re
from pathlib import Path

import pytest
import torch
import torchvision

from refvision.app.cli import lightning_cli, main
from refvision.app.demo.data import write_imagefolder
from refvision.nn.refconv import RefConv

CONFIG = "configs/demo/classification.yaml"


def _args(root: Path, data: Path, *extra: str) -> list[str]:
    return [
        "-c",
        CONFIG,
        *extra,
        "--data.root",
        str(data),
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
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("data") / "images", train_per_class=4, val_per_class=2, size=32)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, data: Path) -> str:
    cli = lightning_cli(["fit", *_args(tmp_path_factory.mktemp("baseline"), data)])
    return cli.trainer.checkpoint_callback.best_model_path


def _basis_of(ckpt: str) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.endswith("weight")}


@pytest.mark.slow
def test_refconv_fit_reparameterize_test(tmp_path: Path, data: Path, baseline: str) -> None:
    cli = lightning_cli(
        ["fit", *_args(tmp_path / "ref", data, "-c", "configs/conv/refconv.yaml", "--model.init_from", baseline)]
    )
    model = cli.model.model
    assert any(isinstance(m, RefConv) for m in model.modules())
    best = Path(cli.trainer.checkpoint_callback.best_model_path)
    deploy = best.with_name("best-deploy.ckpt")
    assert deploy.is_file()
    # The frozen bases are the baseline's kernels, bit for bit.
    base = _basis_of(baseline)
    trained = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    for name, module in model.named_modules():
        if isinstance(module, RefConv):
            assert torch.equal(trained[f"model.{name}.weight"], base[f"model.{name}.weight"])

    # The deploy checkpoint is the vanilla architecture, strictly.
    state = torch.load(deploy, map_location="cpu", weights_only=True)["state_dict"]
    vanilla = torchvision.models.mobilenet_v2(num_classes=4)
    vanilla.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=True)

    # Testing the deploy checkpoint reproduces testing the RefConv checkpoint.
    tested = {}
    for ckpt in (str(best), str(deploy)):
        test_cli = lightning_cli(
            ["test", *_args(tmp_path / "test", data, "-c", "configs/conv/refconv.yaml"), "--ckpt_path", ckpt]
        )
        tested[ckpt] = float(test_cli.trainer.callback_metrics["test/top1"])
        assert any(isinstance(m, RefConv) for m in test_cli.model.modules()) == (ckpt == str(best))
    assert tested[str(best)] == tested[str(deploy)]

    # The subcommand: writes a new file, refuses to overwrite without --overwrite or to touch IN.
    out = tmp_path / "again-deploy.ckpt"
    main(["reparameterize", "--ckpt", str(best), "--output", str(out)])
    assert out.is_file()
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main(["reparameterize", "--ckpt", str(best), "--output", str(out)])
    before = best.read_bytes()
    with pytest.raises(SystemExit, match="is the input checkpoint"):
        main(["reparameterize", "--ckpt", str(best), "--output", str(best), "--overwrite"])
    assert best.read_bytes() == before
    main(["reparameterize", "--ckpt", str(best), "--output", str(out), "--overwrite"])


@pytest.mark.slow
def test_drconv_fit_reparameterize_test(tmp_path: Path, data: Path, baseline: str) -> None:
    cli = lightning_cli(
        [
            "fit",
            *_args(
                tmp_path / "dr",
                data,
                "-c",
                "configs/conv/drconv.yaml",
                "--model.init_from",
                baseline,
                "--model.conv.include",
                "[features.1.*]",
            ),
        ]
    )
    deploy = Path(cli.trainer.checkpoint_callback.best_model_path).with_name("best-deploy.ckpt")
    assert deploy.is_file()
    meta = torch.load(deploy, map_location="cpu", weights_only=True)
    assert meta["hyper_parameters"]["deploy"] is True
    assert meta["refvision"]["max_abs_diff"] < 1e-4
    test_cli = lightning_cli(["test", *_args(tmp_path / "test", data), "--ckpt_path", str(deploy)])
    assert 0.0 <= float(test_cli.trainer.callback_metrics["test/top1"]) <= 1.0


@pytest.mark.slow
def test_resume_keeps_basis_and_optimizer_state(tmp_path: Path, data: Path, baseline: str) -> None:
    args = _args(tmp_path / "ref", data, "-c", "configs/conv/refconv.yaml", "--model.init_from", baseline)
    first = lightning_cli(["fit", *args])
    last = first.trainer.checkpoint_callback.last_model_path
    steps_first = torch.load(last, map_location="cpu", weights_only=True)["optimizer_states"][0]["state"][0]["step"]
    resumed = lightning_cli(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", last])
    final = torch.load(resumed.trainer.checkpoint_callback.last_model_path, map_location="cpu", weights_only=True)
    assert final["epoch"] == 1
    # AdamW's per-parameter step counter continued from the checkpoint instead of restarting.
    assert final["optimizer_states"][0]["state"][0]["step"] == 2 * steps_first
    base = _basis_of(baseline)
    for name, module in resumed.model.model.named_modules():
        if isinstance(module, RefConv):
            assert torch.equal(final["state_dict"][f"model.{name}.weight"], base[f"model.{name}.weight"])


def test_print_config_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture, data: Path) -> None:
    args = _args(tmp_path, data, "-c", "configs/conv/refconv.yaml", "--allow_random_basis", "true")
    with pytest.raises(SystemExit):
        main(["fit", *args, "--print_config"])
    first = capsys.readouterr().out
    assert "kind: refconv" in first and "ClassificationTask" in first
    dumped = tmp_path / "config.yaml"
    dumped.write_text(first)
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(dumped), "--print_config"])
    assert capsys.readouterr().out == first


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--model.backbone", "mobilenet_v9"], r"model\.backbone='mobilenet_v9'.*mobilenet_v2"),
        (["--model.conv.kind", "refocus"], r"conv.*refocus"),
        (
            ["--model.conv.kind", "refconv", "--model.conv.include", "[nothing.*]", "--allow_random_basis", "true"],
            r"matched no|nothing",
        ),
        (["--model.trainable", "some"], r"trainable.*some"),
    ],
)
def test_bad_config_values_name_the_option(
    tmp_path: Path, capsys: pytest.CaptureFixture, data: Path, override: list[str], message: str
) -> None:
    with pytest.raises((SystemExit, ValueError)) as info:
        main(["fit", *_args(tmp_path, data), *override])
    text = str(info.value) + capsys.readouterr().err
    assert re.search(message, text, re.S), text


def test_unknown_conv_kind_lists_allowed_values(tmp_path: Path, capsys: pytest.CaptureFixture, data: Path) -> None:
    with pytest.raises(SystemExit):
        main(["fit", *_args(tmp_path, data), "--model.conv.kind", "refocus"])
    err = capsys.readouterr().err
    assert all(kind in err for kind in ("none", "refconv", "drconv")), err
