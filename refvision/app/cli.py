"""The ``refvision`` command: dispatches to the workflow subcommands or to LightningCLI.

``refvision fit|validate|test|predict`` is LightningCLI (:mod:`refvision.app.lightning_cli`);
``reparameterize``, ``profile``, ``export``, ``demo`` (:mod:`refvision.app.commands`) and ``study``
(:mod:`refvision.app.study`) are
handled before LightningCLI parses, so one entry point serves all.
"""

import difflib
import os
import sys
from collections.abc import Sequence

from refvision.app.commands import EXTRA_COMMANDS as WORKFLOW_COMMANDS
from refvision.app.lightning_cli import ConfigError, lightning_cli
from refvision.app.study.command import study_command
from refvision.checkpoints.loading import CheckpointError
from refvision.outputs.writers.base import OutputExistsError

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
EXTRA_COMMANDS = {**WORKFLOW_COMMANDS, "study": study_command}


def enforce_weights_only() -> None:
    """Make every ``torch.load`` of this process weights-only, whatever its caller asked for.

    refvision's own loads already are; this also covers the libraries' (torchvision's named weights
    through ``torch.hub``, for one), so that no file this command reads can run code.
    """
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``refvision`` console script (``args``: run in-process on these instead of
    the command line, leaving the process's settings alone)."""
    if args is None:
        enforce_weights_only()
    argv = list(sys.argv[1:] if args is None else args)
    if argv and not argv[0].startswith("-") and argv[0] not in (*LIGHTNING_COMMANDS, *EXTRA_COMMANDS):
        commands = [*LIGHTNING_COMMANDS, *EXTRA_COMMANDS]
        close = difflib.get_close_matches(argv[0], commands, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        sys.exit(f"refvision: error: unknown subcommand {argv[0]!r}{hint}; expected one of {', '.join(commands)}")
    if argv and argv[0] in EXTRA_COMMANDS:
        try:
            EXTRA_COMMANDS[argv[0]](argv[1:])
        except (OSError, ValueError) as err:
            sys.exit(f"refvision {argv[0]}: error: {err}")
        return
    try:
        lightning_cli(argv)
    except (ConfigError, CheckpointError, OutputExistsError) as err:
        print(f"refvision {argv[0] if argv else ''}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
