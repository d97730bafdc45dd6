"""Checkpoint files that are damaged, not checkpoints at all, or served over real HTTP on 127.0.0.1:
the URL cache is keyed by the whole URL and checked before reuse."""

import functools
import hashlib
import http.server
import re
import struct
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from refvision.app.cli import main
from refvision.checkpoints.loading import CheckpointError, read_checkpoint, resolve_source
from refvision.tasks.classification import ClassificationTask


class CutShortHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files as usual, except under ``/cut/``: it announces the whole length, sends half, and closes."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if not self.path.startswith("/cut/"):
            super().do_GET()
            return
        body = Path(self.directory, self.path.removeprefix("/cut/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.close_connection = True


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, str]]:
    """A real HTTP server on 127.0.0.1 serving ``tmp_path/www``; downloads land in ``tmp_path/torch_home``."""
    www = tmp_path / "www"
    www.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(CutShortHandler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, Any]:
    """A small train-form classification checkpoint's contents, as Lightning writes them."""
    torch.manual_seed(0)
    task = ClassificationTask(backbone="mobilenet_v2", num_classes=3, image_size=32)
    class_path = f"{type(task).__module__}.{type(task).__qualname__}"
    return {
        "state_dict": task.state_dict(),
        "hyper_parameters": {**dict(task.hparams), "_class_path": class_path},
        "refvision": {"task": class_path, "form": "train"},
    }


def _save(obj: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def _load_url(url: str) -> Any:
    return read_checkpoint(resolve_source(url, "--ckpt_path"), "--ckpt_path", url)


def test_two_urls_with_one_file_name_are_two_files(served: tuple[Path, str]) -> None:
    www, base = served
    _save({"w": torch.zeros(3)}, www / "a" / "best.ckpt")
    _save({"w": torch.ones(3)}, www / "b" / "best.ckpt")
    assert torch.equal(_load_url(f"{base}/a/best.ckpt")["w"], torch.zeros(3))
    assert torch.equal(_load_url(f"{base}/b/best.ckpt")["w"], torch.ones(3))
    assert resolve_source(f"{base}/a/best.ckpt", "x") != resolve_source(f"{base}/b/best.ckpt", "x")


def test_truncated_download_is_not_served_after_the_file_is_fixed(served: tuple[Path, str]) -> None:
    www, base = served
    whole = _save({"w": torch.arange(100000.0)}, www / "model.ckpt").read_bytes()
    (www / "model.ckpt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match=r"--ckpt_path http://.*/model\.ckpt .*truncated"):
        _load_url(f"{base}/model.ckpt")
    (www / "model.ckpt").write_bytes(whole)
    assert torch.equal(_load_url(f"{base}/model.ckpt")["w"], torch.arange(100000.0))


def test_a_damaged_cached_copy_is_downloaded_again(served: tuple[Path, str]) -> None:
    www, base = served
    _save({"w": torch.arange(1000.0)}, www / "model.ckpt")
    cached = resolve_source(f"{base}/model.ckpt", "x")
    data = bytearray(cached.read_bytes())
    data[-30] ^= 0xFF
    cached.write_bytes(bytes(data))
    assert torch.equal(_load_url(f"{base}/model.ckpt")["w"], torch.arange(1000.0))


def test_a_download_cut_short_is_refused_and_not_kept(served: tuple[Path, str]) -> None:
    www, base = served
    _save({"w": torch.arange(100000.0)}, www / "model.ckpt")
    with pytest.raises(CheckpointError, match=r"the download stopped at \d+ of \d+ bytes"):
        resolve_source(f"{base}/cut/model.ckpt", "--ckpt_path")
    assert not [p for p in (served[0].parent / "torch_home").rglob("*") if p.is_file()]


def test_hash_named_urls_are_checked_against_their_name(served: tuple[Path, str]) -> None:
    www, base = served
    good = _save({"w": torch.ones(5)}, www / "tmp.pth").read_bytes()
    prefix = hashlib.sha256(good).hexdigest()[:8]
    (www / f"weights-{prefix}.pth").write_bytes(good)
    assert torch.equal(_load_url(f"{base}/weights-{prefix}.pth")["w"], torch.ones(5))
    (www / f"other-{prefix}.pth").write_bytes(_save({"w": torch.zeros(5)}, www / "tmp2.pth").read_bytes())
    with pytest.raises(CheckpointError, match=rf"SHA-256 is .* but its name says it starts with {prefix}"):
        resolve_source(f"{base}/other-{prefix}.pth", "--ckpt_path")


def test_reparameterize_and_export_take_urls(
    served: tuple[Path, str], tmp_path: Path, checkpoint: dict[str, Any]
) -> None:
    www, base = served
    _save(checkpoint, www / "run" / "best.ckpt")
    main(["reparameterize", "--ckpt", f"{base}/run/best.ckpt", "--output", str(tmp_path / "deploy.ckpt")])
    assert torch.load(tmp_path / "deploy.ckpt", weights_only=True)["refvision"]["form"] == "deploy"
    main(
        [
            "export",
            "--ckpt",
            f"{base}/run/best.ckpt",
            "--output",
            str(tmp_path / "model.pt"),
            "--format",
            "torchscript",
        ]
    )
    assert (tmp_path / "model.pt").stat().st_size > 0


def _flip_a_bit_in_a_tensor(path: Path) -> str:
    """Flip one bit in the stored bytes of the largest tensor of torch's zip archive ``path``; return its entry."""
    with zipfile.ZipFile(path) as archive:
        entry = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    # the data follows the 30-byte local header, its name and its extra field (lengths at bytes 26 and 28)
    name_length, extra_length = struct.unpack_from("<HH", raw, entry.header_offset + 26)
    raw[entry.header_offset + 30 + name_length + extra_length + entry.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    return entry.filename


def test_a_flipped_bit_is_found_by_the_crc_and_the_entry_named(tmp_path: Path, checkpoint: dict[str, Any]) -> None:
    path = _save(checkpoint, tmp_path / "model.ckpt")
    entry = _flip_a_bit_in_a_tensor(path)
    torch.load(path, weights_only=True)  # the fault is real: torch itself loads the damaged file
    with pytest.raises(CheckpointError, match=rf"damaged: entry {entry} of the archive fails its check"):
        read_checkpoint(path, "--ckpt_path")


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (b"step,loss\n0,1.5\n", r"a text file \(it starts with 'step,loss'\)"),
        (b"<!DOCTYPE html>\n<html><body>404</body></html>", "an HTML page"),
        (bytes(range(7, 256)) * 4, "neither a zip archive nor torch's legacy format"),
    ],
    ids=["text", "html", "random bytes"],
)
def test_files_that_are_no_checkpoint_are_named_so(
    tmp_path: Path, capsys: pytest.CaptureFixture, content: bytes, what: str
) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["reparameterize", "--ckpt", str(path), "--output", str(tmp_path / "out.ckpt")])
    message = str(exit_info.value.code)
    assert message.startswith(f"refvision reparameterize: error: --ckpt {path}: not a checkpoint: ")
    assert "\n" not in message and "pickle" not in message
    assert re.search(what, message)


def test_torch_legacy_format_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "old.pth"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(read_checkpoint(path)["w"], torch.ones(2))
