"""Import paths of modules that moved when the package was grouped by layer.

``import refvision.deploy`` keeps working (the module under its new name, with a
DeprecationWarning). ``refvision.convert`` and ``refvision.profile`` are the root's functions, so
their modules' old paths cannot be aliases without shadowing them; importing those raises an error
that names the new path.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

MOVED: dict[str, str] = {
    "refvision.convert": "refvision.surgery.convert",
    "refvision.profile": "refvision.surgery.profile",
    "refvision.trainable": "refvision.surgery.trainable",
    "refvision.checkpoint": "refvision.engine.checkpoint",
    "refvision.deploy": "refvision.engine.deploy",
    "refvision.callbacks": "refvision.engine.callbacks",
    "refvision.export": "refvision.engine.export",
    "refvision.writers": "refvision.engine.writers",
    "refvision.segmentation_inference": "refvision.models.segmentation_inference",
    "refvision.workflow": "refvision.app.demo.run",
    "refvision.data.demo": "refvision.app.demo.data",
}
SHADOWED = ("refvision.convert", "refvision.profile")


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        """The target module is already executed."""


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Resolves the old paths in :data:`MOVED`."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        if new is None:
            return None
        if fullname in SHADOWED:
            raise ModuleNotFoundError(f"{fullname} moved to {new}; the function itself is refvision.{fullname.rpartition('.')[2]}",
                                      name=fullname)
        warnings.warn(f"{fullname} moved to {new}; import it from there", DeprecationWarning, stacklevel=3)
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
