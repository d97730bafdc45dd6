"""Where the ``refvision`` command is, and how to run it as the README writes it (``refvision fit ...``).

``make venv`` (and so ``make demo`` / ``make test``) installs the command into ``.venv/bin``, which is
not on the shell's ``PATH`` until the environment is activated. :func:`command_path_hint` is the line
that says so, with the real paths, for a command to print when it is done.
"""

import shutil
import sys
import sysconfig
from pathlib import Path


def _shown(path: Path) -> str:
    """``path`` relative to the working folder where it lies inside it (``.venv/bin/activate``), else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def command_path_hint() -> str:
    """One line: how to run ``refvision`` as written in the README, naming this installation's files.

    The executable is the console script beside this Python's other scripts (``.venv/bin/refvision``
    after ``make venv``). Already what ``refvision`` finds on ``PATH``: the line says so. In a virtual
    environment: the ``source <venv>/bin/activate`` that puts it on ``PATH``. Otherwise: the folder to add
    to ``PATH``. Paths are relative to the working folder where they lie inside it. The executable and
    the activation script are each written between backquotes.
    """
    scripts = Path(sysconfig.get_path("scripts"))
    command = scripts / "refvision"
    found = shutil.which("refvision")
    if found and Path(found).resolve() == command.resolve():
        return f"refvision: `{_shown(command)}` is on your PATH, so the commands in README.md run as written"
    if sys.prefix != sys.base_prefix:
        activate = scripts / "activate"
        return (
            f"refvision: the command is `{_shown(command)}`; run `source {_shown(activate)}` first in your shell "
            "to put it on your PATH, so the commands in README.md (`refvision fit ...`) run as written"
        )
    return (
        f"refvision: the command is `{_shown(command)}`; add {scripts} to your PATH, so the commands in "
        "README.md (`refvision fit ...`) run as written"
    )
