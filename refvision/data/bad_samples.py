"""What the readers do with bad samples: ``on_bad_sample="raise"`` or ``"skip"``.

Two moments find a bad file:

- at setup, :func:`check_files` / :func:`read_files` read each file's first bytes (in threads,
  so large sets on network storage stay quick): missing, empty and non-image files, PNG bit
  depths and colour types, annotations;
- while loading, a dataset under ``"skip"`` returns a :class:`BadSample` marker instead of
  raising (a truncated file decodes badly only when it is read). :class:`DropBadSamples`, the
  collate function, drops the markers inside the worker process and sends their names to the
  main process together with the batch; :class:`SkippingDataLoader` takes them off the batch,
  so consumers see the usual batches, and logs every skipped file by name when the pass's
  last batch arrives (or raises, naming them, when nothing in it could be loaded).
"""

import logging
from collections.abc import Callable, Iterator, Sequence, Sized
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from torch.utils.data import DataLoader, Dataset, default_collate
from torch.utils.data._utils.pin_memory import pin_memory

from refvision.utils.listing import first_and_more

logger = logging.getLogger("refvision")

OnBadSample = Literal["raise", "skip"]
T = TypeVar("T")
R = TypeVar("R")
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
    """``"path: reason; path: reason; ... and N more"`` for an error or a log line (a reason that
    starts with its path, as the decoders' errors do, is not preceded by it again)."""
    return first_and_more(
        [
            reason if reason.startswith(f"{path}: ") else f"{path}: {reason}" if reason else path
            for path, reason in skipped
        ],
        LISTED,
        "; ",
    )


def read_files(
    items: Sequence[T],
    read: Callable[[T], R],
    on_bad_sample: OnBadSample,
    what: str,
    threads: int = 16,
) -> tuple[list[R], list[tuple[str, str]]]:
    """Run ``read(item)`` on every item (I/O bound: in ``threads`` threads) and apply the policy.

    ``read`` raises ``ValueError`` / ``OSError`` naming the file for a bad item. Returns what
    ``read`` returned for the good items, in their order, and ``(path, reason)`` of the bad ones
    (``path``: the item's first path). Under ``"raise"`` one error lists every bad file (up to
    :data:`LISTED` of them), so a user fixes all at once: ``FileNotFoundError`` when every bad
    file is missing, else ``ValueError``. Under ``"skip"`` each is logged and left out.
    """

    def outcome(item: T) -> R | ValueError | OSError:
        try:
            return read(item)
        except (ValueError, OSError) as error:
            return error

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(outcome, items))
    good = [result for result in results if not isinstance(result, (ValueError, OSError))]
    failed = [(item, result) for item, result in zip(items, results) if isinstance(result, (ValueError, OSError))]
    bad = [(_path_of(item), str(error)) for item, error in failed]
    if bad and on_bad_sample == "raise":
        missing = all(isinstance(error, FileNotFoundError) for _, error in failed)
        raise (FileNotFoundError if missing else ValueError)(
            f"{len(bad)} {'missing' if missing else 'bad'} file(s) in {what} "
            "(set on_bad_sample: skip to leave them out): " + first_and_more([error for _, error in bad], LISTED, "; ")
        )
    for path, error in bad:
        logger.warning("skipping %s: %s", path, error)
    return good, bad


def check_files(
    items: Sequence[T],
    check: Callable[[T], None],
    on_bad_sample: OnBadSample,
    what: str,
    threads: int = 16,
) -> tuple[list[T], list[tuple[str, str]]]:
    """:func:`read_files` for a ``check`` that only raises: returns the good items themselves."""

    def checked(item: T) -> T:
        check(item)
        return item

    return read_files(items, checked, on_bad_sample, what, threads)


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

    A batch whose samples were all bad is not yielded. The files skipped in an iteration over the
    loader are in :attr:`skipped` (path, reason); when its last batch arrives (or the iteration
    is closed before it), one warning names them all. A pass that yields no batch because every sample it loaded was
    bad is a ``ValueError`` naming them instead, and so is a dataset without samples (every
    file left out at setup) when the loader is built: there is nothing to train or evaluate
    on. Constructed like a ``DataLoader`` (Lightning can re-create it with a distributed
    sampler).
    """

    skipped: list[tuple[str, str]]

    def __init__(self, dataset: Dataset, *args: Any, **kwargs: Any) -> None:
        if isinstance(dataset, Sized) and len(dataset) == 0:
            left_out: list[tuple[str, str]] = getattr(dataset, "skipped", [])
            reason = f": all {len(left_out)} file(s) were left out at setup ({describe(left_out)})" if left_out else ""
            raise ValueError(f"{_dataset_name(dataset)} has no samples{reason}; there is nothing to load")
        super().__init__(dataset, *args, **kwargs)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        """Yield the batches; report the pass's skipped files once, when its last batch arrives.

        The report cannot wait for the iteration to end: Lightning stops asking after ``len(self)``
        batches, so a generator's code after its loop would never run during ``fit``. A pass that
        is left before its last batch (``limit_train_batches``, the sanity check) is reported
        when it is closed.
        """
        skipped: list[tuple[str, str]] = []
        self.skipped = skipped
        expected = len(self) if isinstance(self.dataset, Sized) else None
        received = batches = 0
        reported = False
        try:
            for collated in super().__iter__():
                if not isinstance(collated, CollatedBatch):
                    raise TypeError(
                        f"SkippingDataLoader needs a DropBadSamples collate_fn, got {type(collated).__name__}"
                    )
                received += 1
                skipped += collated.skipped
                batches += collated.batch is not None
                if received == expected:
                    reported = True
                    self._report(skipped, batches)
                if collated.batch is not None:
                    yield collated.batch
            if not reported:
                reported = True
                self._report(skipped, batches)
        except GeneratorExit:
            if not reported and skipped:
                self._report(skipped, batches, f"the {received} batch(es) read of ")
            raise

    def _report(self, skipped: list[tuple[str, str]], batches: int, part: str = "") -> None:
        """Warn naming the ``skipped`` files of this pass (or ``part`` of it); raise if it gave no batch."""
        if skipped and not batches and not part:
            raise ValueError(
                f"every sample loaded in this pass over {_dataset_name(self.dataset)} was bad, so it gave no "
                f"batch to train or evaluate on; {len(skipped)} skipped: {describe(skipped)}"
            )
        if skipped:
            logger.warning(
                "skipped %d bad sample(s) in %sthis pass over %s: %s",
                len(skipped),
                part,
                _dataset_name(self.dataset),
                describe(skipped),
            )


def _dataset_name(dataset: Any) -> str:
    root = getattr(dataset, "root", None)
    return f"{type(dataset).__name__}({Path(root)})" if root is not None else type(dataset).__name__
