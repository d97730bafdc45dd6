"""Untrusted checkpoint files: planted pickle payloads (local and over real HTTP), truncated, empty and wrong-task
files."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from refvision.app.cli import lightning_cli, main
from refvision.app.demo.data import write_cityscapes, write_imagefolder, write_vocdevkit
from refvision.checkpoints.loading import CheckpointError


class Payload:
    """Pickles as a call to ``os.makedirs(marker)``: unpickling it with pickle creates the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.makedirs, (str(self.marker),)


def _classifier_args(data: Path, root: Path, *extra: str) -> list[str]:
    return [
        "-c",
        "configs/demo/classification.yaml",
        "--data.root",
        str(data),
        "--data.image_size",
        "32",
        "--data.resize_size",
        "32",
        "--data.batch_size",
        "4",
        "--model.image_size",
        "32",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger",
        "false",
        "--trainer.limit_test_batches",
        "2",
        *extra,
    ]


def _save_task_checkpoint(args: list[str], path: Path) -> Path:
    """Build the task of ``args`` through the CLI and write it as Lightning writes a checkpoint."""
    cli = lightning_cli([*args, "--trainer.logger", "false"], run=False)
    cli.trainer.strategy.connect(cli.model)
    cli.trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("data") / "images", train_per_class=2, val_per_class=2, size=32)


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    root = tmp_path_factory.mktemp("good")
    return _save_task_checkpoint(_classifier_args(data, root), root / "good.ckpt")


def _planted(path: Path, marker: Path, good: Path) -> Path:
    """A real checkpoint with one extra entry that runs code when unpickled."""
    checkpoint = torch.load(good, map_location="cpu", weights_only=True)
    checkpoint["callbacks"] = {"evil": Payload(marker)}
    torch.save(checkpoint, path)
    return path


def test_the_planted_payload_is_real(tmp_path: Path, good_ckpt: Path) -> None:
    marker = tmp_path / "ran"
    torch.load(_planted(tmp_path / "evil.ckpt", marker, good_ckpt), weights_only=False)
    assert marker.exists()  # so the tests below would see it, had refvision unpickled the file


def test_init_from_url_with_payload_is_refused(
    served: tuple[Path, str], tmp_path: Path, data: Path, good_ckpt: Path
) -> None:
    www, url = served
    marker = tmp_path / "ran"
    _planted(www / "evil.ckpt", marker, good_ckpt)
    with pytest.raises(
        ValueError,
        match=r"(?s)model\.init_from http://127\.0\.0\.1:\d+/evil\.ckpt \(downloaded to .*\) "
        r"needs pickle.*os\.makedirs"
        r".*weights_only=True.*If you trust the file",
    ):
        lightning_cli([*_classifier_args(data, tmp_path, "--model.init_from", f"{url}/evil.ckpt")], run=False)
    assert not marker.exists()
    # downloaded (into the cache folder of its URL), then refused
    assert [p.name for p in (tmp_path / "torch_home" / "hub" / "checkpoints").rglob("*.ckpt")] == ["evil.ckpt"]


@pytest.mark.parametrize("command", ["test", "fit"])
def test_ckpt_path_url_with_payload_is_refused(
    served: tuple[Path, str], tmp_path: Path, data: Path, good_ckpt: Path, command: str
) -> None:
    www, url = served
    marker = tmp_path / "ran"
    _planted(www / "evil.ckpt", marker, good_ckpt)
    with pytest.raises(
        CheckpointError, match=r"--ckpt_path http.*evil\.ckpt \(downloaded to .*\) needs pickle.*os\.makedirs"
    ):
        lightning_cli([command, *_classifier_args(data, tmp_path, "--ckpt_path", f"{url}/evil.ckpt")])
    assert not marker.exists()


def test_local_payload_is_refused_by_every_command(tmp_path: Path, data: Path, good_ckpt: Path) -> None:
    marker = tmp_path / "ran"
    evil = _planted(tmp_path / "evil.ckpt", marker, good_ckpt)
    with pytest.raises(CheckpointError, match="needs pickle"):
        lightning_cli(["validate", *_classifier_args(data, tmp_path, "--ckpt_path", str(evil))])
    for argv in (
        ["reparameterize", "--ckpt", str(evil), "--output", str(tmp_path / "out.ckpt")],
        ["profile", "--ckpt", str(evil)],
        ["export", "--ckpt", str(evil), "--output", str(tmp_path / "out.onnx"), "--format", "onnx"],
    ):
        with pytest.raises(SystemExit, match=r"--ckpt .*evil\.ckpt needs pickle"):
            main(argv)
    assert not marker.exists()
    assert not (tmp_path / "out.ckpt").exists() and not (tmp_path / "out.onnx").exists()


def test_weights_only_false_is_refused(tmp_path: Path, data: Path, good_ckpt: Path) -> None:
    with pytest.raises(ValueError, match="weights_only=True only"):
        lightning_cli(
            ["test", *_classifier_args(data, tmp_path, "--ckpt_path", str(good_ckpt), "--weights_only", "false")]
        )


def test_ckpt_path_url_loads_safely_and_equals_the_local_file(
    served: tuple[Path, str], tmp_path: Path, data: Path, good_ckpt: Path
) -> None:
    www, url = served
    shutil.copy(good_ckpt, www / "good.ckpt")
    results = []
    for source in (str(good_ckpt), f"{url}/good.ckpt"):
        cli = lightning_cli(["test", *_classifier_args(data, tmp_path, "--ckpt_path", source)])
        results.append(float(cli.trainer.callback_metrics["test/top1"]))
        expected = torch.load(good_ckpt, map_location="cpu", weights_only=True)["state_dict"]
        for key, value in cli.model.state_dict().items():
            assert torch.equal(value, expected[key]), key
    assert results[0] == results[1]


def test_truncated_and_empty_checkpoints_name_the_file(tmp_path: Path, data: Path, good_ckpt: Path) -> None:
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good_ckpt.read_bytes()[: good_ckpt.stat().st_size // 2])
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    expected = {
        truncated: r"truncated\.ckpt: not a complete PyTorch checkpoint .*truncated",
        empty: r"empty\.ckpt: the file is empty \(0 bytes\)",
    }
    for path, message in expected.items():
        with pytest.raises(CheckpointError, match=r"--ckpt_path .*" + message):
            lightning_cli(["test", *_classifier_args(data, tmp_path, "--ckpt_path", str(path))])
        with pytest.raises(ValueError, match=r"model\.init_from .*" + message):
            lightning_cli([*_classifier_args(data, tmp_path, "--model.init_from", str(path))], run=False)
        with pytest.raises(SystemExit, match=r"--ckpt .*" + message):
            main(["reparameterize", "--ckpt", str(path), "--output", str(tmp_path / "out.ckpt")])


def test_truncated_safetensors_names_the_file(tmp_path: Path, data: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        lightning_cli([*_classifier_args(data, tmp_path, "--model.init_from", str(path))], run=False)


def test_detection_checkpoint_given_to_segmentation_config(tmp_path: Path) -> None:
    voc = write_vocdevkit(tmp_path / "VOCdevkit", num_train=2, num_test=2, size=(64, 64))
    det = _save_task_checkpoint(["-c", "configs/demo/detection.yaml", "--data.root", str(voc)], tmp_path / "det.ckpt")
    cityscapes = write_cityscapes(tmp_path / "cityscapes", num_train=1, num_val=1, size=(32, 64))
    args = [
        "-c",
        "configs/demo/segmentation.yaml",
        "--data.root",
        str(cityscapes),
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--ckpt_path",
        str(det),
    ]
    with pytest.raises(
        CheckpointError,
        match=r"--ckpt_path .*det\.ckpt holds a refvision DetectionTask checkpoint "
        r"\(detector=ssdlite320_mobilenet_v3_large, num_classes=\d+, protocol=voc\), "
        r"but the config builds .*SegmentationTask",
    ):
        lightning_cli(["test", *args])
    with pytest.raises(ValueError, match=r"(?s)init_from=.*det\.ckpt.*holds a refvision DetectionTask checkpoint"):
        lightning_cli([*args[:-2], "--model.init_from", str(det)], run=False)
