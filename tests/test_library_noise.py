"""A run prints what it does, not the libraries' noise: the causes that are refvision's are fixed
(pinned memory on the CPU, Lightning's default checkpoint callback replaced by the task's), the
libraries' own messages are left out by their exact text, and every other warning still shows."""

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from fit_process import REPO, checkpoint_dir, fit_args
from lightning import Trainer

from refvision.app.lightning_cli import LIBRARY_NOISE_WARNINGS, library_noise_filtered
from refvision.data.imagefolder import ImageFolderDataModule

NOISE = {
    "pin_memory on the CPU": "'pin_memory' argument is set as true but no accelerator is found",
    "callback override": "will override existing callbacks passed to Trainer",
    "litlogger tip": "try installing [litlogger]",
    "litmodels tip": "try installing [litmodels]",
    "pytree deprecation": "`isinstance(treespec, LeafSpec)` is deprecated",
    "on_after_batch_transfer note": "You have overridden `on_after_batch_transfer` in `LightningModule`",
}


def _command(*args: str) -> str:
    """Run ``python -m refvision ARGS`` in the repository; its stdout + stderr (it must succeed)."""
    done = subprocess.run(
        [sys.executable, "-m", "refvision", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


@pytest.mark.slow
def test_fit_and_test_print_no_library_noise(tmp_path: Path, image_folder_template: Path) -> None:
    # The default pin_memory (true) of the data module, and the trainer on the CPU.
    run = [*fit_args(tmp_path, image_folder_template, "--trainer.max_epochs", "1"), "--trainer.accelerator", "cpu"]
    fitted = _command(*run)
    best = checkpoint_dir(tmp_path) / "best.ckpt"
    tested = _command("test", *run[1:], "--ckpt_path", str(best))
    for name, text in NOISE.items():
        assert text not in fitted, f"fit printed the {name}"
        assert text not in tested, f"test printed the {name}"
    assert "test/top1" in tested  # the run's own output is still there


def test_pinned_memory_only_for_an_accelerator(image_folder_template: Path) -> None:
    data = ImageFolderDataModule(str(image_folder_template), image_size=16, resize_size=16, batch_size=2, num_workers=0)
    assert data.pin_memory  # asked for (the default) ...
    data.trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    data.setup("fit")
    # ... but the batches go to the CPU: no loader pins, and none warns that it cannot.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="'pin_memory' argument")
        for loader in (data.train_dataloader(), data.val_dataloader()):
            assert loader.pin_memory is False
            next(iter(loader))


class _Records(logging.Handler):
    """Keeps the messages of the records it is given."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_only_the_listed_messages_are_left_out() -> None:
    [(_, _, pytree_module)] = [entry for entry in LIBRARY_NOISE_WARNINGS if "LeafSpec" in entry[0]]
    lightning_module = pytree_module.replace("\\", "")
    message = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # where rank_zero_info logs
    tip = "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](...) to enable it."
    records, level = _Records(), rank_zero.level
    rank_zero.addHandler(records)
    rank_zero.setLevel(logging.INFO)
    try:
        with library_noise_filtered(), warnings.catch_warnings(record=True) as seen:
            # The same text from another module, another text from Lightning's module, and the listed one.
            warnings.warn_explicit(message, FutureWarning, "user.py", 1, module="user_code")
            warnings.warn_explicit("another deprecation", FutureWarning, "_pytree.py", 2, module=lightning_module)
            warnings.warn_explicit(message, FutureWarning, "_pytree.py", 3, module=lightning_module)
            rank_zero.info(tip)
            rank_zero.info("💡 Tip: something else")
        rank_zero.info(tip)  # after the block, Lightning's logger passes everything again
    finally:
        rank_zero.removeHandler(records)
        rank_zero.setLevel(level)
    assert [(str(w.message), w.lineno) for w in seen] == [(message, 1), ("another deprecation", 2)]
    assert records.messages == ["💡 Tip: something else", tip]
