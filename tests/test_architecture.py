"""The package's layers: imports only go down, no cycle, one name per module."""

import ast
import importlib
import re
from pathlib import Path

import refvision

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "refvision"

# Lower index = lower layer. A module may import its own layer and the layers below it.
LAYERS: dict[str, int] = {
    "refvision.utils": 0,
    "refvision.nn": 0,
    "refvision.surgery": 0,
    "refvision.models": 1,
    "refvision.data": 1,
    "refvision.metrics": 1,
    "refvision.tasks": 2,
    "refvision.checkpoints": 2,
    "refvision.lifecycle": 2,
    "refvision.outputs": 2,
    "refvision.export": 2,
    "refvision.inference": 2,
    "refvision.app": 3,
}
PURE_TORCH = ("refvision.nn", "refvision.surgery")
LAYER_MAP = REPO / "docs" / "architecture.md"
"""The one layer map for people: its table must list exactly the rooms of :data:`LAYERS`, on their floors."""


def _sources() -> dict[str, Path]:
    """Module name -> file, for the whole package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("refvision", *path.relative_to(PACKAGE).with_suffix("").parts)
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        found[".".join(parts)] = path
    return found


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(f"{node.module}.{a.name}", id(node) in top) for a in node.names]
            found.append((node.module, id(node) in top))
    return found


def _layer(module: str) -> str | None:
    return next((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), None)


def _internal(imported: str, known: set[str]) -> str | None:
    while imported and imported not in known:
        imported = imported.rpartition(".")[0]
    return imported or None


def test_imports_only_go_down_and_surgery_is_pure_torch() -> None:
    sources = _sources()
    wrong = []
    for name, path in sources.items():
        own = _layer(name)
        for imported, _ in _imports(path):
            if own in PURE_TORCH and imported.split(".")[0] in ("lightning", "pytorch_lightning", "torchmetrics"):
                wrong.append(f"{name} imports {imported} (pure-torch layer)")
            target = _layer(imported)
            if own is not None and target is not None and LAYERS[target] > LAYERS[own]:
                wrong.append(f"{name} ({own}) imports {imported} ({target})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_and_no_function_level_internal_import() -> None:
    sources = _sources()
    known = set(sources)
    graph: dict[str, set[str]] = {}
    hidden = []
    for name, path in sources.items():
        edges = set()
        for imported, top_level in _imports(path):
            target = _internal(imported, known)
            if target is None or target == name:
                continue
            edges.add(target)
            if not top_level:
                hidden.append(f"{name} imports {target} inside a function")
        graph[name] = edges
    assert not hidden, "\n".join(hidden)

    # Packages import their submodules by design; a cycle is between modules beyond that.
    def is_parent(a: str, b: str) -> bool:
        return b.startswith(a + ".")

    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if is_parent(node, nxt) or is_parent(nxt, node):
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_package_has_no_symbolic_links() -> None:
    links = [str(p.relative_to(REPO)) for p in PACKAGE.rglob("*") if p.is_symlink()]
    assert not links, links


def test_root_functions_are_the_surgery_functions() -> None:
    profile_module = importlib.import_module("refvision.surgery.profile")
    assert refvision.profile is profile_module.profile and refvision.surgery.profile is profile_module.profile
    assert refvision.convert is importlib.import_module("refvision.surgery.convert").convert
    assert callable(refvision.reparameterize)


def _mapped_rooms(markdown: str) -> dict[str, int]:
    """Room -> floor of the ``| floor | room | what lives there |`` table of a markdown text."""
    lines = markdown.splitlines()
    header = next(i for i, line in enumerate(lines) if re.fullmatch(r"\|\s*floor\s*\|\s*room\s*\|.*\|", line.strip()))
    rooms = {}
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        floor, room = (cell.strip() for cell in line.strip().strip("|").split("|")[:2])
        path = re.fullmatch(r"`(refvision(?:/\w+)+)/`", room)
        assert path is not None, f"{LAYER_MAP.name}: room {room!r} is not a `refvision/<room>/` folder"
        rooms[path.group(1).replace("/", ".")] = int(floor)
    return rooms


def test_the_layer_map_lists_exactly_the_enforced_rooms_on_their_floors() -> None:
    assert _mapped_rooms(LAYER_MAP.read_text()) == LAYERS


def test_the_layer_map_check_sees_a_missing_room_and_a_wrong_floor() -> None:
    text = LAYER_MAP.read_text()
    without_export = "\n".join(line for line in text.splitlines() if "`refvision/export/`" not in line)
    assert "refvision.export" not in _mapped_rooms(without_export)
    moved = text.replace("| 1 | `refvision/metrics/`", "| 2 | `refvision/metrics/`")
    assert _mapped_rooms(moved)["refvision.metrics"] == 2 != LAYERS["refvision.metrics"]


def test_every_package_folder_is_a_room_of_the_map() -> None:
    folders = {f"refvision.{p.name}" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert folders == set(LAYERS)
