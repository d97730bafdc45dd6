"""``python -m refvision``: the ``refvision`` command."""

from refvision.app.cli import main

main()
