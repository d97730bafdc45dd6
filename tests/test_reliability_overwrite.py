"""Never overwrite without being asked: export onto its own checkpoint, reparameterize onto a directory."""

from pathlib import Path

import pytest
from fit_process import fit_in_process

from refvision.app.cli import main
from refvision.app.demo.data import write_imagefolder


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RefConv train-form checkpoint from a real one-step fit."""
    data = write_imagefolder(tmp_path_factory.mktemp("data") / "images", train_per_class=8, val_per_class=2, size=32)
    cli = fit_in_process(
        tmp_path_factory.mktemp("fit"),
        data,
        "-c",
        "configs/conv/refconv.yaml",
        "--allow_random_basis",
        "true",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "1",
    )
    return Path(cli.trainer.checkpoint_callback.best_model_path)


@pytest.mark.parametrize("through", ["same path", "symlink", "hard link"])
def test_export_never_replaces_its_checkpoint(tmp_path: Path, trained: Path, through: str) -> None:
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(trained.read_bytes())
    output = {"same path": ckpt, "symlink": tmp_path / "link.pt", "hard link": tmp_path / "hard.pt"}[through]
    if through == "symlink":
        output.symlink_to(ckpt)
    elif through == "hard link":
        output.hardlink_to(ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(SystemExit, match="is the input checkpoint --ckpt"):
        main(["export", "--ckpt", str(ckpt), "--output", str(output), "--format", "torchscript", "--overwrite"])
    assert ckpt.read_bytes() == before


@pytest.mark.parametrize("command", ["reparameterize", "export"])
def test_overwrite_onto_a_directory_leaves_nothing_behind(tmp_path: Path, trained: Path, command: str) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "kept.txt").write_text("mine")
    extra = ["--format", "torchscript"] if command == "export" else []
    with pytest.raises(SystemExit, match=f"--output {target} is a directory"):
        main([command, "--ckpt", str(trained), "--output", str(target), "--overwrite", *extra])
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept.txt", "out"]
