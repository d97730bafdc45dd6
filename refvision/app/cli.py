"""The ``refvision`` command: dispatches to the workflow subcommands or to LightningCLI.

``refvision fit|validate|test|predict`` is LightningCLI (:mod:`refvision.app.lightning_cli`);
``reparameterize``, ``profile``, ``export`` and ``demo`` (:mod:`refvision.app.commands`) are
handled before LightningCLI parses, so one entry point serves all.
"""

import sys
from collections.abc import Sequence

from refvision.app.commands import EXTRA_COMMANDS
from refvision.app.lightning_cli import ConfigError, lightning_cli


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``refvision`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] in EXTRA_COMMANDS:
        try:
            EXTRA_COMMANDS[argv[0]](argv[1:])
        except (OSError, ValueError) as err:
            sys.exit(f"refvision {argv[0]}: error: {err}")
        return
    try:
        lightning_cli(argv)
    except ConfigError as err:
        print(f"refvision {argv[0] if argv else ''}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
