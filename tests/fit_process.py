"""Real `refvision fit` runs on a tiny generated image folder: as subprocesses (to kill or signal) or in-process."""

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from refvision.app.cli import lightning_cli

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 3
T = TypeVar("T")


def fit_args(root: Path, data: Path, *extra: str) -> list[str]:
    """``fit`` arguments: MobileNetV2 on 32x32 images, batches of 8, 3 steps and 1 val batch per epoch."""
    return [
        "fit",
        "-c",
        "configs/demo/classification.yaml",
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
        "--trainer.limit_train_batches",
        str(STEPS_PER_EPOCH),
        "--trainer.limit_val_batches",
        "1",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


def start_fit(root: Path, data: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``python -m refvision fit ...`` in the repository; its output goes to ``root/fit-<n>.log``."""
    root.mkdir(parents=True, exist_ok=True)
    log = root / f"fit-{len(list(root.glob('fit-*.log')))}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "refvision", *fit_args(root, data, *extra)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    process.log_path = log  # type: ignore[attr-defined]
    return process


def output_of(process: subprocess.Popen) -> str:
    """What a :func:`start_fit` process printed."""
    return process.log_path.read_text(errors="replace")  # type: ignore[attr-defined]


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    """Wait for a successful exit; returns the output (raises with it otherwise)."""
    if process.wait(timeout=timeout) != 0:
        raise AssertionError(f"fit exited {process.returncode}:\n{output_of(process)[-4000:]}")
    return output_of(process)


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.005) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def checkpoint_dir(root: Path, version: int = 0) -> Path:
    return root / "lightning_logs" / f"version_{version}" / "checkpoints"


def fit_in_process(root: Path, data: Path, *extra: str):
    """Run ``fit`` in this process; returns the LightningCLI."""
    return lightning_cli(fit_args(root, data, *extra))


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
