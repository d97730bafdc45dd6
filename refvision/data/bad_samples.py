"""What the readers do with bad samples: ``on_bad_sample="raise"`` or ``"skip"``.

Two moments find a bad file:

- at setup, :func:`check_files` reads each file's first bytes (in threads, so large sets on
  network storage stay quick): missing, empty and non-image files, PNG bit depths;
- while loading, a dataset under ``"skip"`` returns a :class:`BadSample` marker instead of
  raising (a truncated file decodes badly only when it is read). :class:`DropBadSamples`, the
  collate function, drops the markers inside the worker process and sends their names to the
  main process together with the batch; :class:`SkippingDataLoader` takes them off the batch,
  so consumers see the usual batches, and logs every skipped file by name when the epoch's
  iteration ends.
"""

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from torch.utils.data import DataLoader, default_collate
from torch.utils.data._utils.pin_memory import pin_memory

logger = logging.getLogger("refvision")

OnBadSample = Literal["raise", "skip"]
T = TypeVar("T")
LISTED = 10
"""How many file names an error or a report lists before it says "and N more"."""


def check_policy(on_bad_sample: str) -> None:
    """Raise ``ValueError`` unless ``on_bad_sample`` is ``"raise"`` or ``"skip"``."""
    if on_bad_sample not in ("raise", "skip"):
        raise ValueError(f"on_bad_sample must be 'raise' or 'skip', got {on_bad_sample!r}")


@dataclass(frozen=True)
class BadSample:
    """Returned by a dataset's ``__getitem__`` under ``"skip"`` in place of a sample it cannot load."""

    path: str
    reason: str


def describe(skipped: Sequence[tuple[str, str]]) -> str:
    """``"path: reason; path: reason; ... and N more"`` for an error or a log line."""
    listed = "; ".join(f"{path}: {reason}" if reason else path for path, reason in skipped[:LISTED])
    more = len(skipped) - LISTED
    return listed + (f"; ... and {more} more" if more > 0 else "")


def check_files(
    items: Sequence[T],
    check: Callable[[T], None],
    on_bad_sample: OnBadSample,
    what: str,
    threads: int = 16,
) -> tuple[list[T], list[tuple[str, str]]]:
    """Run ``check(item)`` on every item (I/O bound: in ``threads`` threads) and apply the policy.

    ``check`` raises ``ValueError`` / ``OSError`` naming the file for a bad item. Returns the
    good items in their order and ``(path, reason)`` of the bad ones. Under ``"raise"`` one
    ``ValueError`` lists every bad file (up to :data:`LISTED` of them), so a user fixes all
    at once; under ``"skip"`` each is logged and left out.
    """
    def outcome(item: T) -> str | None:
        try:
            check(item)
        except (ValueError, OSError) as error:
            return str(error)
        return None

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(outcome, items))
    good = [item for item, error in zip(items, results) if error is None]
    bad = [(_path_of(item), error) for item, error in zip(items, results) if error is not None]
    if bad and on_bad_sample == "raise":
        raise ValueError(
            f"{len(bad)} bad file(s) in {what} (set on_bad_sample: skip to leave them out): "
            + "; ".join(error for _, error in bad[:LISTED])
            + (f"; ... and {len(bad) - LISTED} more" if len(bad) > LISTED else "")
        )
    for path, error in bad:
        logger.warning("skipping %s: %s", path, error)
    return good, bad


def _path_of(item: Any) -> str:
    """The first path in an item (a path, or a tuple starting with one)."""
    if isinstance(item, (tuple, list)):
        return _path_of(item[0])
    return str(item)


@dataclass
class CollatedBatch:
    """A batch on its way from a worker to :class:`SkippingDataLoader`, with the samples it dropped."""

    batch: Any
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def pin_memory(self) -> "CollatedBatch":
        """Pin the batch (the DataLoader's ``pin_memory=True``), keep the names."""
        return CollatedBatch(pin_memory(self.batch) if self.batch is not None else None, self.skipped)


class DropBadSamples:
    """Collate function: drop :class:`BadSample` markers, collate the rest with ``collate_fn``.

    Returns a :class:`CollatedBatch`; its ``batch`` is ``None`` when every sample was bad.
    Picklable, so it runs in the worker processes.
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None = None) -> None:
        self.collate_fn = collate_fn or default_collate

    def __call__(self, samples: list[Any]) -> CollatedBatch:
        skipped = [(s.path, s.reason) for s in samples if isinstance(s, BadSample)]
        good = [s for s in samples if not isinstance(s, BadSample)]
        return CollatedBatch(self.collate_fn(good) if good else None, skipped)


class SkippingDataLoader(DataLoader):
    """A ``DataLoader`` whose ``collate_fn`` is a :class:`DropBadSamples`; yields the plain batches.

    A batch whose samples were all bad is not yielded. When an iteration over the loader
    ends, the files skipped during it are in :attr:`skipped` (path, reason) and, if any, one
    warning names them all. Constructed like a ``DataLoader`` (Lightning can re-create it
    with a distributed sampler).
    """

    skipped: list[tuple[str, str]]

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skipped: list[tuple[str, str]] = []
        self.skipped = skipped
        for collated in super().__iter__():
            if not isinstance(collated, CollatedBatch):
                raise TypeError(f"SkippingDataLoader needs a DropBadSamples collate_fn, got {type(collated).__name__}")
            skipped += collated.skipped
            if collated.batch is not None:
                yield collated.batch
        if skipped:
            logger.warning(
                "skipped %d bad sample(s) in this pass over %s: %s",
                len(skipped), _dataset_name(self.dataset), describe(skipped),
            )


def _dataset_name(dataset: Any) -> str:
    root = getattr(dataset, "root", None)
    return f"{type(dataset).__name__}({Path(root)})" if root is not None else type(dataset).__name__
