"""The one way an error or a log line lists many items: the first few, then how many more."""

from collections.abc import Sequence


def first_and_more(items: Sequence[str], limit: int, separator: str = ", ") -> str:
    """The first ``limit`` of ``items`` joined by ``separator``, then ``"... and N more"`` for the rest.

    ``first_and_more(["a", "b", "c"], 2)`` is ``"a, b, ... and 1 more"``; with at most ``limit``
    items it is their plain join.
    """
    more = len(items) - limit
    return separator.join([*items[:limit], *([f"... and {more} more"] if more > 0 else [])])
