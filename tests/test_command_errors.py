"""Bad input to the workflow commands is one line naming the file, key or value, and nothing is written.

Checkpoints whose contents do not rebuild their task, `profile` options that cannot work, and
`--output` paths that cannot be written, each refused before any expensive work.
"""

import os
from pathlib import Path
from typing import Any

import pytest
import torch

import refvision.checkpoints.deploy
import refvision.utils.atomic_file
from refvision.app.cli import main
from refvision.checkpoints.deploy import load_task_checkpoint
from refvision.checkpoints.loading import CheckpointError
from refvision.tasks.classification import ClassificationTask
from refvision.utils.atomic_file import check_writable, written_atomically

CONFIG = str(Path(__file__).resolve().parents[1] / "configs/demo/classification.yaml")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The contents of a small train-form classification checkpoint, as Lightning writes it."""
    task = ClassificationTask(backbone="mobilenet_v2", num_classes=3, image_size=32)
    class_path = f"{type(task).__module__}.{type(task).__qualname__}"
    return {
        "state_dict": task.state_dict(),
        "hyper_parameters": {**dict(task.hparams), "_class_path": class_path},
        "refvision": {"task": class_path, "form": "train"},
    }


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory: pytest.TempPathFactory, checkpoint: dict[str, Any]) -> str:
    path = tmp_path_factory.mktemp("good") / "good.ckpt"
    torch.save(checkpoint, path)
    return str(path)


def _edited(checkpoint: dict[str, Any], path: Path, edit: str) -> str:
    hparams, state = dict(checkpoint["hyper_parameters"]), dict(checkpoint["state_dict"])
    if edit == "extra hyper-parameter":
        hparams["old_option"] = 1
    elif edit == "missing key":
        del state["model.classifier.1.bias"]
    elif edit == "resized key":
        state["model.classifier.1.weight"] = state["model.classifier.1.weight"][:2]
    torch.save({**checkpoint, "hyper_parameters": hparams, "state_dict": state}, path)
    return str(path)


@pytest.mark.parametrize("command", ["reparameterize", "export", "profile"])
def test_a_hyper_parameter_the_task_does_not_take_is_named(
    tmp_path: Path, checkpoint: dict[str, Any], command: str
) -> None:
    ckpt = _edited(checkpoint, tmp_path / "old.ckpt", "extra hyper-parameter")
    args = {
        "reparameterize": ["--output", str(tmp_path / "out.ckpt")],
        "export": ["--output", str(tmp_path / "out.pt"), "--format", "torchscript"],
        "profile": [],
    }[command]
    with pytest.raises(SystemExit, match=rf"--ckpt {ckpt}: .*'old_option', which ClassificationTask does not take"):
        main([command, "--ckpt", ckpt, *args])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.ckpt"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("missing key", r"1 key\(s\) missing: model\.classifier\.1\.bias"),
        (
            "resized key",
            r"1 key\(s\) of another shape: model\.classifier\.1\.weight "
            r"\(checkpoint 2x1280, expected 3x1280\)",
        ),
    ],
)
def test_weights_that_do_not_fit_the_task_are_named(
    tmp_path: Path, checkpoint: dict[str, Any], edit: str, message: str
) -> None:
    ckpt = _edited(checkpoint, tmp_path / "edited.ckpt", edit)
    with pytest.raises(CheckpointError, match=rf"--ckpt {ckpt}: its state_dict does not fit .*{message}"):
        load_task_checkpoint(ckpt)


def test_profile_refuses_configs_with_a_checkpoint(good_ckpt: str) -> None:
    with pytest.raises(SystemExit, match="refvision profile: error: -c .* and --ckpt .*: give one, not both"):
        main(["profile", "-c", CONFIG, "--ckpt", good_ckpt, "--min_run_time", "0.01"])


@pytest.mark.parametrize(
    ("option", "value", "message", "gpus"),
    [
        ("--device", "gpu", "--device 'gpu': not a device name; expected cpu, cuda or cuda:N", 0),
        ("--device", "cuda", "--device cuda: no CUDA GPU is usable here", 0),
        (
            "--device",
            "cuda:1",
            r"--device cuda:1: this machine has 1 CUDA GPU\(s\); expected cpu or cuda:0 to cuda:0",
            1,
        ),
        ("--input_size", "[0,32]", r"--input_size \[0, 32\]: expected \[height, width\], two positive integers", 0),
    ],
)
def test_profile_options_are_checked_up_front(
    monkeypatch: pytest.MonkeyPatch, option: str, value: str, message: str, gpus: int
) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(SystemExit, match=f"refvision profile: error: {message}"):
        main(["profile", "-c", CONFIG, option, value, "--min_run_time", "0.01"])


def _never_loaded(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the checkpoint was read before --output was checked")


@pytest.mark.parametrize("command", ["reparameterize", "export"])
@pytest.mark.parametrize("case", ["parent is a file", "trailing slash", "read-only folder"])
def test_unwritable_output_is_refused_before_the_checkpoint_is_read(
    tmp_path: Path, good_ckpt: str, monkeypatch: pytest.MonkeyPatch, command: str, case: str
) -> None:
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "ro").mkdir()
    output, message = {
        "parent is a file": (f"{tmp_path}/afile/sub/m.pt", f"its parent path {tmp_path}/afile is a file, not a folder"),
        "trailing slash": (f"{tmp_path}/newout/", "ends in '/', so it names a folder; expected the path of a file"),
        "read-only folder": (f"{tmp_path}/ro/m.pt", f"the folder {tmp_path}/ro is not writable"),
    }[case]
    access = os.access
    monkeypatch.setattr(
        refvision.utils.atomic_file.os,
        "access",
        lambda path, mode: Path(path) != tmp_path / "ro" and access(path, mode),
    )
    monkeypatch.setattr(refvision.checkpoints.deploy, "load_task_checkpoint", _never_loaded)
    extra = ["--format", "torchscript"] if command == "export" else []
    with pytest.raises(
        SystemExit,
        match=f"refvision {command}: error: --output {output}: {message}"
        if case != "trailing slash"
        else f"refvision {command}: error: --output {output} {message}",
    ):
        main([command, "--ckpt", good_ckpt, "--output", output, *extra])
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["afile", "ro"]
    assert (tmp_path / "afile").read_text() == "mine"


def test_written_atomically_names_the_target_not_its_temporary(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(NotADirectoryError, match=f"{tmp_path}/afile/m.pt: its parent path {tmp_path}/afile is a file"):
        with written_atomically(tmp_path / "afile" / "m.pt"):
            pytest.fail("nothing may be written")
    with pytest.raises(IsADirectoryError, match="x/ ends in '/'"):
        check_writable(f"{tmp_path}/x/")
    check_writable(tmp_path / "new" / "folders" / "m.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
