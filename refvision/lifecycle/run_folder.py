"""A failed command removes the log folder it created while nothing of value is in it."""

import csv
import logging
import shutil
from pathlib import Path

log = logging.getLogger("refvision")

NOTHING_OF_VALUE = ("config.yaml", "hparams.yaml", "metrics.csv", "events.out.tfevents.*")
"""What the command and its loggers write into a run folder before the run has results: the config,
the hyper-parameters, an empty metrics table, TensorBoard's event file."""


def remove_if_nothing_of_value(folder: str | Path) -> bool:
    """Remove ``folder`` (recursively) if it holds only :data:`NOTHING_OF_VALUE` files, no ``metrics.csv`` row
    and no checkpoint, else leave it; return whether it was removed. A missing folder is not an error."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    for path in folder.rglob("*"):
        if path.is_dir():
            continue
        if not any(path.match(pattern) for pattern in NOTHING_OF_VALUE) or _has_rows(path):
            return False
    shutil.rmtree(folder, ignore_errors=True)
    log.info("removed %s: the command failed before writing anything to keep there", folder)
    return True


def _has_rows(path: Path) -> bool:
    """Whether ``path`` is a metrics table with a row of values under its header."""
    if path.name != "metrics.csv":
        return False
    with path.open(newline="") as f:
        return sum(1 for _ in csv.reader(f)) > 1
