"""Command-line faults: errors print their cause alone; sizes cannot disagree; every load is weights-only."""

import os
import pickle
from pathlib import Path

import pytest
import torch

from refvision.app.cli import enforce_weights_only, main
from refvision.app.demo.data import write_imagefolder
from refvision.app.lightning_cli import lightning_cli
from refvision.nn import registered_methods

CONFIG = "configs/demo/classification.yaml"


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("data") / "images", train_per_class=2, val_per_class=1, size=32)


def _fit_args(images: Path, root: Path, *extra: str) -> list[str]:
    return [
        "-c",
        CONFIG,
        "--data.root",
        str(images),
        "--data.num_workers",
        "0",
        "--data.batch_size",
        "4",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "1",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(root),
        *extra,
    ]


@pytest.mark.parametrize(
    "override, cause",
    [
        (
            ["--trainer.max_epochs", "abc"],
            "refvision fit: error: trainer.max_epochs: Expected a <class 'int'>. Got value: abc",
        ),
        (
            ["--model.conv.kind", "refocus"],
            "refvision fit: error: model.conv.kind: conv kind 'refocus' is unknown; "
            f"registered: {', '.join(sorted(registered_methods()))},",
        ),
        (
            ["--data.root", "/no/such/folder"],
            "refvision fit: error: image-folder split /no/such/folder/train does not exist",
        ),
    ],
)
def test_config_errors_print_the_cause_alone(
    tmp_path: Path, images: Path, capsys: pytest.CaptureFixture, override: list[str], cause: str
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_fit_args(images, tmp_path), *override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(cause), err
    assert "Namespace(" not in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_data_image_size_is_the_models(tmp_path: Path, images: Path) -> None:
    # A valid --data.image_size used to fail with "Error while merging hparams" (model 224 vs data 48).
    cli = lightning_cli(["fit", *_fit_args(images, tmp_path, "--data.image_size", "48", "--data.resize_size", "48")])
    assert cli.model.image_size == cli.datamodule.hparams.image_size == 48
    assert cli.model.example_inputs().shape[-2:] == (48, 48)
    assert cli.trainer.state.finished


class _Payload:
    marker: Path

    def __reduce__(self) -> tuple:
        return (os.makedirs, (str(self.marker),))


def test_every_load_of_the_command_is_weights_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's named weights load through torch.hub with weights_only=False; the command overrides it."""
    payload = _Payload()
    payload.marker = tmp_path / "payload-ran"
    planted = tmp_path / "weights.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": payload}, planted)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    # setenv first, so that the variable enforce_weights_only sets is removed after the test.
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0")
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    enforce_weights_only()
    assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1" and "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ
    with pytest.raises(pickle.UnpicklingError):
        torch.hub.load_state_dict_from_url(planted.as_uri(), model_dir=str(tmp_path / "hub"), weights_only=False)
    assert not payload.marker.exists()
