"""The command never runs something other than what it was asked, on weights it was not given,
and never writes over another run's files; what it refuses it says in one line."""

import urllib.error
from pathlib import Path

import pytest
import torch

from refvision.app.cli import lightning_cli, main
from refvision.app.demo.data import write_imagefolder
from refvision.app.lightning_cli import ConfigError

CONFIG = "configs/demo/classification.yaml"
REFCONV = "configs/conv/refconv.yaml"


def _args(data: Path, root: Path, *extra: str) -> list[str]:
    return [
        "-c",
        CONFIG,
        "--data.root",
        str(data),
        "--data.image_size",
        "32",
        "--data.resize_size",
        "32",
        "--data.batch_size",
        "4",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "1",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.limit_test_batches",
        "1",
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(root),
        *extra,
    ]


def _error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """The one line that ``refvision ARGV`` prints when it refuses (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"refvision {argv[0]}: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("data") / "images", train_per_class=1, val_per_class=1, size=32)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data: Path) -> dict[str, Path]:
    """A baseline fit and a RefConv fit from it (``--trainer.logger false``: checkpoints in ``<root>/checkpoints``)."""
    base, ref = tmp_path_factory.mktemp("base"), tmp_path_factory.mktemp("ref")
    lightning_cli(["fit", *_args(data, base)])
    lightning_cli(["fit", *_args(data, ref, "-c", REFCONV, "--model.init_from", str(base / "checkpoints/best.ckpt"))])
    return {
        "base_root": base,
        "base": base / "checkpoints/best.ckpt",
        "ref": ref / "checkpoints/best.ckpt",
        "deploy": ref / "checkpoints/best-deploy.ckpt",
    }


def test_offline_named_weights_say_what_to_do(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(url: str, *args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    advice = {
        "weights": "pass it with `--model.init_from /path/to/file.pth` (and set `model.weights` to null)",
        "init_from": "give its path to `model.init_from` instead of the address",
    }
    for option, value in (("weights", "DEFAULT"), ("init_from", "torchvision://resnet18")):
        err = _error(capsys, ["validate", *_args(data, tmp_path, f"--model.{option}", value)])
        assert f"requested by `model.{option}`" in err and advice[option] in err, err


def test_ckpt_path_refuses_model_options_it_would_replace(
    tmp_path: Path, data: Path, runs: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    # mobilenet_v2 is the task's default: named on the command line, it is given all the same.
    err = _error(
        capsys, ["test", *_args(data, tmp_path, "--model.backbone", "mobilenet_v2", "--ckpt_path", str(runs["base"]))]
    )
    assert "model.backbone=mobilenet_v2 but the checkpoint --ckpt_path" in err and "has model.backbone=resnet18" in err
    err = _error(capsys, ["fit", *_args(data, tmp_path / "new", "-c", REFCONV, "--ckpt_path", str(runs["base"]))])
    assert (
        "model.conv={'kind': 'refconv'" in err
        and "to start a new training from these weights use --model.init_from" in err
    )
    assert not (tmp_path / "new").exists()
    # The training form's config fits its deploy checkpoint; options not given leave the checkpoint's.
    cli = lightning_cli(["test", *_args(data, tmp_path, "-c", REFCONV, "--ckpt_path", str(runs["deploy"]))])
    assert cli.model.conv_config["kind"] == "none"
    cli = lightning_cli(["test", *_args(data, tmp_path, "--ckpt_path", str(runs["ref"]))])
    assert cli.model.conv_config["kind"] == "refconv"


def test_init_from_refuses_what_would_load_silently_wrong(
    tmp_path: Path, data: Path, runs: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    # The RefConv training form keeps the frozen basis under `weight`: never loaded as the trained kernel.
    for extra in ([], ["--model.init_strict", "false"]):
        with pytest.raises(
            ConfigError,
            match=r"training form of a conv\.kind=refconv model.*best-deploy\.ckpt.*"
            r"refvision reparameterize",
        ) as info:
            lightning_cli(_args(data, tmp_path, "--model.init_from", str(runs["ref"]), *extra), run=False)
        assert "init_strict" not in str(info.value)
    # Outside fit nothing trains what init_from leaves out (the head), whatever init_strict says.
    state = torch.load(runs["base"], map_location="cpu", weights_only=True)["state_dict"]
    headless = tmp_path / "headless.pth"
    torch.save({k.removeprefix("model."): v for k, v in state.items() if ".fc." not in k}, headless)
    err = _error(
        capsys, ["predict", *_args(data, tmp_path, "--model.init_from", str(headless), "--model.init_strict", "false")]
    )
    assert "fc.weight" in err and "random initialisation" in err, err
    err = _error(
        capsys, ["test", *_args(data, tmp_path, "--model.init_from", str(runs["base"]), "--model.backbone", "resnet34")]
    )
    assert "To test a refvision checkpoint pass it as --ckpt_path" in err and "init_strict" not in err, err


def test_evaluating_needs_weights(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture) -> None:
    for name in ("best", "last"):
        err = _error(capsys, ["test", *_args(data, tmp_path, "--ckpt_path", name)])
        assert f"--ckpt_path {name}: refvision test runs no fit" in err and f"checkpoints/{name}.ckpt" in err
    with pytest.warns(
        UserWarning,
        match=r"refvision validate: no weights given \(--ckpt_path, --model\.init_from, "
        r"--model\.weights\); the model is evaluated as built, with random weights",
    ):
        lightning_cli(["validate", *_args(data, tmp_path)])


def test_ckpt_path_errors_are_one_line(
    tmp_path: Path, data: Path, runs: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    err = _error(capsys, ["test", *_args(data, tmp_path, "--ckpt_path", str(empty))])
    assert "empty.ckpt: the file is empty (0 bytes)" in err
    err = _error(capsys, ["validate", *_args(data, tmp_path, "--ckpt_path", str(tmp_path / "missing.ckpt"))])
    assert "missing.ckpt" in err and "no such file" in err
    # A deploy checkpoint holds no training state: refused before the fit creates anything.
    err = _error(capsys, ["fit", *_args(data, tmp_path / "resume", "--ckpt_path", str(runs["deploy"]))])
    assert "is a deploy checkpoint (weights only); it cannot resume a fit" in err and "--model.init_from" in err
    assert not (tmp_path / "resume").exists()


def test_runs_without_logger_keep_earlier_runs(
    tmp_path: Path, data: Path, runs: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    root = runs["base_root"]
    kept = {p: p.read_bytes() for p in (root / "config.yaml", root / "checkpoints/last.ckpt")}
    err = _error(capsys, ["fit", *_args(data, root)])
    assert f"checkpoint folder {root / 'checkpoints'} holds another run's last.ckpt" in err
    assert f"--ckpt_path {root / 'checkpoints/last.ckpt'}" in err and "--trainer.default_root_dir" in err
    assert all(path.read_bytes() == content for path, content in kept.items())
    # Evaluations write their config and tables into a fresh folder each, beside the fit's.
    for n in range(2):
        cli = lightning_cli(["test", *_args(data, root, "--ckpt_path", str(runs["base"]))])
        assert Path(cli.trainer.log_dir) == root / f"test_{n}"
        assert (root / f"test_{n}" / "test_per_class.csv").is_file() and (root / f"test_{n}" / "config.yaml").is_file()
    assert all(path.read_bytes() == content for path, content in kept.items())


def test_unknown_subcommand_lists_every_command() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["reparameterise", "--ckpt", "x.ckpt"])
    message = str(exit_info.value.code)
    assert "unknown subcommand 'reparameterise' (did you mean reparameterize?)" in message
    for command in ("fit", "validate", "test", "predict", "reparameterize", "profile", "export", "demo"):
        assert command in message.rpartition("expected one of")[2]
