"""Test-session settings.

``make test`` runs the suite on two pytest-xdist workers (one per core of the 2-core CI machine);
each worker then computes with one thread, and so do the processes it starts, so that the two
never compete for the same core.
"""

import functools
import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from refvision.app.demo.data import write_imagefolder

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def image_folder_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated image folder, two classes of 4 train / 2 val 24 x 24 images; read only."""
    return write_imagefolder(
        tmp_path_factory.mktemp("imagefolder"),
        classes=("circle", "square"),
        train_per_class=4,
        val_per_class=2,
        size=24,
    )


@pytest.fixture()
def tree(image_folder_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of :func:`image_folder_template` that the test may damage."""
    return Path(shutil.copytree(image_folder_template, tmp_path / "tree"))


CUDA_SKIP = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=CUDA_SKIP)])
def device(request: pytest.FixtureRequest) -> Iterator[str]:
    """The device a test runs on: ``cpu``, and ``cuda`` where a CUDA device is present (skipped
    with the reason elsewhere). On CUDA, float32 convs and matmuls run in IEEE float32 for the
    test (PyTorch lets cuDNN convs use TF32 by default, 10 mantissa bits), so float32 tolerances
    mean the same on both devices."""
    if request.param == "cpu":
        yield "cpu"
        return
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield "cuda"
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """An HTTP server on 127.0.0.1 serving ``tmp_path/www``, and its URL; downloads go to ``tmp_path/torch_home``."""
    www = tmp_path / "www"
    www.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
