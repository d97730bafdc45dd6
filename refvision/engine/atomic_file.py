"""Files that appear whole or not at all: write a temporary file beside the target, fsync, rename.

The temporary file lives in the target's own directory (never ``TMPDIR``), so the final
``os.replace`` is a rename within one filesystem: a reader sees the old file or the new one,
never a truncated one. Temporary names carry the writer's pid (``.<name>.<pid>.<token>.partial<suffix>``);
a process killed while writing leaves one behind, which :func:`remove_stale_temporaries`
deletes once that pid is gone.
"""

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

_TEMPORARY = re.compile(r"^\..+\.(?P<pid>\d+)\.[0-9a-f]{8}\.partial(\.[^.]*)?$")


def temporary_path(target: str | os.PathLike, suffix: str | None = None) -> Path:
    """A fresh temporary name for ``target`` in its directory, ending in ``suffix`` (default: ``target``'s)."""
    target = Path(target)
    suffix = target.suffix if suffix is None else suffix
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.partial{suffix}")


def is_temporary(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named like a :func:`temporary_path`."""
    return _TEMPORARY.match(Path(path).name) is not None


@contextlib.contextmanager
def written_atomically(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path (ending in ``suffix``, for writers that go by it) to write; on success
    it is fsynced and renamed to ``target``.

    On any exception the temporary file is removed and ``target`` is left as it was.
    ``target`` must not be a directory.
    """
    target = Path(target)
    if target.is_dir():
        raise IsADirectoryError(f"{target} is a directory; expected a file path")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(target, suffix)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(target.parent)


@contextlib.contextmanager
def open_atomically(target: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file object whose contents replace ``target`` atomically when the block succeeds."""
    with written_atomically(target) as tmp, open(tmp, "wb") as file:
        yield file


def save_atomically(obj: Any, target: str | os.PathLike) -> None:
    """``torch.save(obj, target)``, atomically."""
    with open_atomically(target) as file:
        torch.save(obj, file)


def copy_atomically(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy the file ``source`` to ``target``, atomically."""
    with open_atomically(target) as out, open(source, "rb") as src:
        shutil.copyfileobj(src, out)


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete this module's temporary files in ``directory`` whose writing process is gone.

    Returns the removed paths. Files of live processes (another run writing there) are kept.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.iterdir():
        match = _TEMPORARY.match(path.name)
        if match and path.is_file() and not _alive(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
