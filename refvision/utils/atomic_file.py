"""Files that appear whole or not at all: write a temporary file beside the target, fsync, rename.

The temporary file lives in the target's own directory (never ``TMPDIR``), so the final
``os.replace`` is a rename within one filesystem: a reader sees the old file or the new one,
never a truncated one. Temporary names carry the writer's pid (``.<name>.<pid>.<token>.partial<suffix>``);
a process killed while writing leaves one behind, which :func:`remove_stale_temporaries`
deletes once that pid is gone.
"""

import contextlib
import errno
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


def check_writable(target: str | os.PathLike, name: str | None = None) -> None:
    """Raise unless a file can be written at ``target`` (messages start with ``name``, default ``target``).

    ``target`` must name a file: not an existing directory, not a path ending in a separator. Its
    missing parent folders may be created, so the nearest existing one must be a writable folder.

    Raises:
        IsADirectoryError: ``target`` is a directory or ends in a separator.
        NotADirectoryError: a parent of ``target`` is a file.
        PermissionError: the folder that would hold ``target`` (or its missing parents) is not writable.
    """
    name = str(target) if name is None else name
    text = os.fspath(target)
    if text.endswith(("/", os.sep)):
        raise IsADirectoryError(f"{name} ends in '{text[-1]}', so it names a folder; expected the path of a file")
    target = Path(text)
    if target.is_dir():
        raise IsADirectoryError(f"{name} is a directory; expected the path of a file")
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(
            f"{name}: its parent path {folder} is a file, not a folder; expected a path inside folders"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{name}: the folder {folder} is not writable; expected a path in a folder you may write to"
        )


@contextlib.contextmanager
def written_atomically(target: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path (ending in ``suffix``, for writers that go by it) to write; on success
    it is fsynced and renamed to ``target``.

    On any exception the temporary file is removed and ``target`` is left as it was. ``target``
    is checked by :func:`check_writable` first, so a path that cannot be written is reported by
    its own name, not the temporary file's.
    """
    check_writable(target)
    target = Path(target)
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


def link_atomically(source: str | os.PathLike, target: str | os.PathLike) -> bool:
    """Make ``target`` a hard link to the file ``source`` (one copy on disk, two names), atomically.

    Returns True; False where the filesystem has no hard links between the two, and ``source`` was
    copied instead (:func:`copy_atomically`). Safe only while every writer of both names replaces
    files as this module does (a rename): an in-place write to one name would change the other too.
    """
    check_writable(target)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(target)
    try:
        os.link(source, tmp)
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        copy_atomically(source, target)
        return False
    try:
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)  # left when target already was this file: rename then does nothing
    _fsync_directory(target.parent)
    return True


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
