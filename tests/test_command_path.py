"""The README's commands are written as ``refvision ...``: the line a command prints to say where
``refvision`` is names an executable that runs, and the activation it gives puts that one on PATH;
the README's quickstart activates the environment before its first ``refvision`` command."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from refvision.app.command_path import command_path_hint

REPO = Path(__file__).resolve().parents[1]
FRESH_SHELL_PATH = "/usr/bin:/bin"
"""``PATH`` of a shell in which no environment is activated."""
PRINT_HINT = "from refvision.app.command_path import command_path_hint; print(command_path_hint())"


def test_hint_names_the_command_and_how_to_put_it_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", FRESH_SHELL_PATH)
    hint = command_path_hint()
    command, *rest = re.findall(r"`([^`]+)`", hint)
    executable = Path(command).resolve()
    assert executable.is_file() and executable.name == "refvision", hint
    if sys.prefix == sys.base_prefix:  # not a virtual environment: the folder to add to PATH
        assert str(executable.parent) in hint
        script = f"PATH={executable.parent}:$PATH"
    else:
        [activation] = [text for text in rest if text.startswith("source ")]
        assert Path(activation.removeprefix("source ")).is_file(), hint
        script = activation
    # A fresh shell that does what the line says finds this executable as `refvision`, which runs,
    # and the line printed there says that the command is now on PATH.
    shell = subprocess.run(
        [
            "bash",
            "-c",
            f"{script} && command -v refvision && refvision --help && {sys.executable} -c '{PRINT_HINT}'",
        ],
        env={"PATH": FRESH_SHELL_PATH, "PYTHONPATH": str(REPO), "HOME": str(Path.home())},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert shell.returncode == 0, shell.stderr[-4000:]
    found, *_, said = shell.stdout.strip().splitlines()
    assert Path(found).resolve() == executable
    assert re.search(r"usage: refvision .*\bfit\b", shell.stdout, re.S)
    assert "is on your PATH" in said


def test_readme_quickstart_activates_before_the_first_command() -> None:
    venv = re.search(r"^VENV \?= (\S+)$", (REPO / "Makefile").read_text(), re.M)[1]
    activation = f"source {venv}/bin/activate"
    lines = (REPO / "README.md").read_text().splitlines()
    quickstart = lines.index("## Quickstart")
    end = next(i for i in range(quickstart + 1, len(lines)) if lines[i].startswith("## "))
    in_code, first_command = False, None
    for number, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            in_code = not in_code
        elif in_code and re.match(r"\s*refvision\s", line):
            first_command = number
            break
    assert first_command is not None, "README.md runs no refvision command"
    activated = [n for n in range(quickstart, end) if activation in lines[n]]
    assert activated and activated[0] < first_command, (
        f"README.md's Quickstart does not say `{activation}` before its first refvision command (line "
        f"{first_command + 1}: {lines[first_command].strip()})"
    )
