"""Classes named by dotted path, as configs and checkpoints name tasks and conv methods."""

import importlib


def import_class(class_path: str) -> type:
    """The class named by ``class_path`` (``package.module.Name``).

    Raises:
        ValueError: ``class_path`` has no module part, or names something that is not a class.
        ImportError: the module does not import.
        AttributeError: the module has no such name.
    """
    module, _, name = class_path.rpartition(".")
    if not module:
        raise ValueError(f"{class_path!r} is not a class path; expected 'package.module.ClassName'")
    found = getattr(importlib.import_module(module), name)
    if not isinstance(found, type):
        raise ValueError(f"{class_path!r} names a {type(found).__name__}, not a class")
    return found
