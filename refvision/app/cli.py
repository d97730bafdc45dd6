"""The ``refvision`` command: dispatches to the workflow subcommands or to LightningCLI.

``refvision fit|validate|test|predict`` is LightningCLI (:mod:`refvision.app.lightning_cli`);
``reparameterize``, ``profile``, ``export``, ``demo`` (:mod:`refvision.app.commands`) and ``study``
(:mod:`refvision.app.study`) are handled before LightningCLI parses, so one entry point serves all.
Errors follow one rule (:func:`main`).
"""

import difflib
import os
import sys
from collections.abc import Sequence

from lightning.fabric.utilities.exceptions import MisconfigurationException

from refvision.app.commands import EXTRA_COMMANDS as WORKFLOW_COMMANDS
from refvision.app.lightning_cli import ConfigError, lightning_cli
from refvision.app.study.command import study_command
from refvision.checkpoints.loading import CheckpointError
from refvision.lifecycle.divergence import TrainingDiverged
from refvision.models.weights import WeightsUnavailableError
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


DEBUG_SWITCH = "--debug"
"""Anywhere on the command line (or ``REFVISION_DEBUG=1``): an error shows its traceback."""

USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    OSError,
    TrainingDiverged,
    WeightsUnavailableError,
    MisconfigurationException,
)
"""What a command refuses or cannot do (bad config, data, checkpoint, folder, device; a diverged fit): one line,
``refvision <cmd>: error: ...``. Any other exception is a defect of refvision and keeps its traceback."""


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``refvision`` console script (``args``: run in-process on these instead of
    the command line, leaving the process's settings alone).

    Every :data:`USER_ERRORS` exception ends the command with one line on stderr, ``refvision <cmd>:
    error: <message>``: exit status 2 where ``fit / validate / test / predict`` refuse their config,
    checkpoint or output folder before running (argparse's status for a bad command line), 1 otherwise; with
    :data:`DEBUG_SWITCH` or ``REFVISION_DEBUG=1`` it is raised with its traceback instead.
    """
    if args is None:
        enforce_weights_only()
    argv = list(sys.argv[1:] if args is None else args)
    debug = DEBUG_SWITCH in argv or os.environ.get("REFVISION_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != DEBUG_SWITCH]
    if argv and not argv[0].startswith("-") and argv[0] not in (*LIGHTNING_COMMANDS, *EXTRA_COMMANDS):
        commands = [*LIGHTNING_COMMANDS, *EXTRA_COMMANDS]
        close = difflib.get_close_matches(argv[0], commands, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        sys.exit(f"refvision: error: unknown subcommand {argv[0]!r}{hint}; expected one of {', '.join(commands)}")
    try:
        if argv and argv[0] in EXTRA_COMMANDS:
            EXTRA_COMMANDS[argv[0]](argv[1:])
        else:
            lightning_cli(argv)
    except USER_ERRORS as err:
        if debug:
            raise
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        line = f"refvision {argv[0] if argv else ''}: error: {message}"
        if (
            argv
            and argv[0] in LIGHTNING_COMMANDS
            and isinstance(err, (ConfigError, CheckpointError, OutputExistsError))
        ):
            print(line, file=sys.stderr)
            raise SystemExit(2) from None
        raise SystemExit(line) from None


if __name__ == "__main__":
    main()
