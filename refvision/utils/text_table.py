"""The one text-table renderer of refvision (rich): styled on a terminal, plain ASCII otherwise.

Plain output uses ``-`` rules and space-separated columns, so log files and CI output stay readable.
"""

from collections.abc import Sequence
from io import StringIO

from rich import box
from rich.console import Console
from rich.table import Table

_PLAIN = box.Box(
    "    \n    \n----\n    \n----\n----\n    \n    \n",
    ascii=True,
)
"""Space-separated columns, a ``-`` rule under the header and above the footer."""


def render_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    footer: Sequence[Sequence[str]] = (),
    terminal: bool | None = None,
) -> str:
    """Render an aligned table: the first column left-aligned, the others right-aligned.

    Args:
        header: column titles.
        rows: one sequence of cell strings per row, ``len(header)`` cells each.
        footer: summary rows (e.g. the mean), drawn after a rule.
        terminal: style for a terminal (bold header, box-drawing rules); default: whether
            standard error is one (where Lightning's console log goes). Otherwise plain text.

    Returns:
        The lines joined by ``\\n``, all of the same width, no trailing newline.
    """
    for row in (*rows, *footer):
        if len(row) != len(header):
            raise ValueError(f"table row {list(row)}: expected {len(header)} cells ({list(header)}), got {len(row)}")
    if terminal is None:
        terminal = Console(stderr=True).is_terminal
    table = Table(
        box=box.HORIZONTALS if terminal else _PLAIN,
        show_edge=False,
        pad_edge=False,
        header_style="bold" if terminal else "",
    )
    for i, title in enumerate(header):
        table.add_column(title, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    if footer:
        table.add_section()
        for row in footer:
            table.add_row(*row)
    out = StringIO()
    console = Console(
        file=out,
        width=10_000,
        force_terminal=terminal,
        no_color=not terminal,
        color_system="auto" if terminal else None,
        highlight=False,
    )
    console.print(table)
    return "\n".join(line.rstrip("\n") for line in out.getvalue().rstrip("\n").split("\n"))
