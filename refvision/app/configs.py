"""Where the shipped configs are: ``configs/`` of a source checkout, or ``refvision/configs`` of a wheel."""

from pathlib import Path

import refvision

_PACKAGE = Path(refvision.__file__).resolve().parent


def config_root() -> Path:
    """The folder holding ``classification/``, ``conv/``, ``demo/``... (see ``setup.py``)."""
    packaged = _PACKAGE / "configs"
    return packaged if packaged.is_dir() else _PACKAGE.parent / "configs"
