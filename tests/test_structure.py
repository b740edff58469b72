"""The package's layering, checked from its source: no import cycles, no import against the layer
order, and no function too long to read at once (outside the CLI commands).

The checker reads every ``.py`` file under ``src/clipforge`` with :mod:`ast`, so it sees imports at
module level and inside functions alike (a lazy import still ties two modules together), except
those under ``if TYPE_CHECKING:``, which never run. ``from pkg import name`` counts as an import of
``pkg.name`` when that is a module, else of ``pkg``. Importing ``a.b.c`` is not counted as importing
the packages ``a`` and ``a.b`` as well: every module would otherwise sit in a cycle with its own
package's ``__init__``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
TOP = "clipforge"
MAX_FUNCTION_LINES = 60
#: A comment on a long function's ``def`` line, or on the line above it, that says why it is long.
LONG_MARKER = "# long:"

#: (importing layer, imported layers it must not reach). A layer is a module or a package prefix.
_CLI = ("clipforge.commands", "clipforge.cli")
FORBIDDEN: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "clipforge.model",
        (
            "clipforge.checkpoints",
            "clipforge.data",
            "clipforge.train",
            "clipforge.eval",
            "clipforge.search",
            *_CLI,
        ),
    ),
    ("clipforge.data", ("clipforge.train", "clipforge.eval", "clipforge.search")),
)
#: Modules allowed to import the CLI; every other (library) module must not.
CLI_SIDE = ("clipforge.commands", "clipforge.cli", "clipforge.__main__")


@dataclass(frozen=True, order=True)
class Edge:
    """One import statement that ties module ``src`` to module ``dst`` (at ``file:line``)."""

    src: str
    dst: str
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.src} imports {self.dst}"


def in_layer(module: str, layer: str) -> bool:
    """``clipforge.model`` holds ``clipforge.model`` and ``clipforge.model.x`` but not ``clipforge.models``."""
    return module == layer or module.startswith(layer + ".")


def module_names(src: Path, top: str = TOP) -> dict[str, Path]:
    """Every module of the package under ``src/<top>``, by dotted name (a package by its own name)."""
    names = {}
    for path in sorted((src / top).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _shown(path: Path, src: Path) -> str:
    """A file as the findings name it: from the repository root (``src/clipforge/x.py``), or from
    ``src`` for a package elsewhere (the self-test's)."""
    return str(path.relative_to(ROOT if ROOT in path.parents else src))


def _is_type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:``."""
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _import_nodes(node: ast.AST):
    """The Import/ImportFrom nodes below ``node``, skipping the bodies of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:  # the else branch does run
                yield from _import_nodes_of(other)
            continue
        yield from _import_nodes_of(child)


def _import_nodes_of(node: ast.AST):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    yield from _import_nodes(node)


def _base_of(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a (possibly relative) ``from X import ...`` names."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    if node.level - 1 > len(package) - 1:
        raise ValueError(f"relative import beyond the top package in {module} at line {node.lineno}")
    anchor = package[: len(package) - (node.level - 1)]
    return ".".join(anchor + ([node.module] if node.module else []))


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The package's modules one import statement names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = _base_of(node, module, is_package)
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if sub in known else base)
    return out


def _owning_module(name: str, known: set[str]) -> str | None:
    """``import clipforge.model.config`` names a module; a longer name (an attribute) maps to
    the longest known prefix. None for names outside the package."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            return candidate
    return None


def import_edges(src: Path = SRC, top: str = TOP) -> list[Edge]:
    """Every import between two of the package's modules, one Edge per imported name."""
    modules = module_names(src, top)
    known = set(modules)
    edges = set()
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        rel = _shown(path, src)
        for node in _import_nodes(tree):
            for target in _targets(node, module, is_package, known):
                dst = _owning_module(target, known)
                if dst is not None and dst != module:
                    edges.add(Edge(module, dst, rel, node.lineno))
    return sorted(edges)


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components (iterative: the graph may be deep), sorted; only those with 2+ members."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def _path_back(graph: dict[str, set[str]], members: set[str], start: str, goal: str) -> list[str]:
    """The shortest path ``start ... goal`` inside one component (breadth first, sorted: stable)."""
    parents = {start: start}
    frontier = [start]
    while goal not in parents:
        reached = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child not in parents:
                    parents[child] = node
                    reached.append(child)
        if not reached:
            raise AssertionError(f"no path {start} -> {goal} inside {sorted(members)}")
        frontier = reached
    path = [goal]
    while path[-1] != start:
        path.append(parents[path[-1]])
    return path[::-1]


def _rotated(chain: list[str]) -> list[str]:
    """A closed chain started at its smallest member, so one cycle always reads the same."""
    ring = chain[:-1]
    at = ring.index(min(ring))
    ring = ring[at:] + ring[:at]
    return [*ring, ring[0]]


def import_cycles(edges: list[Edge]) -> list[list[str]]:
    """Closed chains ``[a, b, ..., a]`` of modules that import each other in a circle: within each
    group of mutually reachable modules, chains are added until every import inside the group
    lies on one, so the list shows every import that would have to go."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.src, set()).add(e.dst)
        graph.setdefault(e.dst, set())
    chains = []
    for component in _strongly_connected(graph):
        members = set(component)
        uncovered = sorted((a, b) for a in component for b in graph[a] & members)
        while uncovered:
            a, b = uncovered[0]
            chain = [a, *_path_back(graph, members, b, a)]
            covered = set(zip(chain, chain[1:]))
            uncovered = [pair for pair in uncovered if pair not in covered]
            chains.append(_rotated(chain))
    return sorted(chains)


def forbidden_imports(edges: list[Edge]) -> list[Edge]:
    """Imports against the layer order (see FORBIDDEN and CLI_SIDE)."""
    bad = []
    for e in edges:
        rules = [banned for layer, banned in FORBIDDEN if in_layer(e.src, layer)]
        if not any(in_layer(e.src, side) for side in CLI_SIDE):
            rules.append(_CLI)
        if any(in_layer(e.dst, b) for banned in rules for b in banned):
            bad.append(e)
    return bad


def _has_reason(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A ``# long: why`` comment on the def line, the line above it, or above its decorators."""
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    candidates = {node.lineno, node.lineno - 1, first - 1}
    for number in candidates:
        if 1 <= number <= len(lines):
            text = lines[number - 1]
            at = text.find(LONG_MARKER)
            if at >= 0 and text[at + len(LONG_MARKER) :].strip():
                return True
    return False


def long_functions(src: Path = SRC, top: str = TOP, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``file:line name (N lines)`` for every def over ``limit`` lines outside ``commands/``,
    counted from the ``def`` line to the last line of its body, without a reason given."""
    found = []
    for module, path in module_names(src, top).items():
        if in_layer(module, f"{top}.commands"):
            continue
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            if length > limit and not _has_reason(lines, node):
                found.append(f"{_shown(path, src)}:{node.lineno} {node.name} ({length} lines)")
    return sorted(found)


def _report(title: str, rows: list[str]) -> str:
    text = f"{title} ({len(rows)}):\n" + "\n".join(f"  {r}" for r in rows)
    print(text)
    return text


# --- the package ---------------------------------------------------------------------------------
def test_no_import_cycles():
    cycles = import_cycles(import_edges())
    assert not cycles, _report("import cycles", [" -> ".join(c) for c in cycles])


def test_no_imports_against_the_layers():
    bad = forbidden_imports(import_edges())
    assert not bad, _report("forbidden imports", [str(e) for e in bad])


def test_no_function_over_60_lines_outside_commands():
    long = long_functions()
    assert not long, _report(f"functions over {MAX_FUNCTION_LINES} lines without '{LONG_MARKER} why'", long)


# --- the checker itself, on a tiny package with one of each fault ---------------------------------
def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _body(n: int) -> str:
    return "".join(f"    x{i} = {i}\n" for i in range(n))


SYNTHETIC = {
    "clipforge/__init__.py": "",
    # a reason on the def line counts; an empty one does not
    "clipforge/errors.py": "import os\n\ndef table():  # long: one flat table\n"
    + _body(70)
    + "\n# long:\ndef bare():\n"
    + _body(70),
    "clipforge/cli.py": "from clipforge.commands import run\n",
    "clipforge/commands/__init__.py": "",
    "clipforge/commands/run.py": "from .. import errors\n\ndef long():\n" + _body(70),
    "clipforge/model/__init__.py": "from .clip import CLIP\n",
    # model -> checkpoints, inside a function: forbidden; the TYPE_CHECKING import is not counted
    "clipforge/model/clip.py": (
        "from typing import TYPE_CHECKING\n"
        "from clipforge import errors\n"
        "if TYPE_CHECKING:\n"
        "    from clipforge.train import trainer\n"
        "class CLIP:\n"
        "    def load(self):\n"
        "        from ..checkpoints.load import read\n"
    ),
    # a three-module cycle, through a relative import, a package __init__ and `from pkg import mod`
    "clipforge/checkpoints/__init__.py": "from .load import read\n",
    "clipforge/checkpoints/load.py": "from clipforge.data import shards\nimport clipforge.model.clip\n",
    "clipforge/data/__init__.py": "",
    "clipforge/train/__init__.py": "",
    "clipforge/train/trainer.py": "",
    "clipforge/data/shards.py": "import clipforge.checkpoints\n\n# long: one table, read top to bottom\ndef table():\n"
    + _body(70),
    # a library module reaching the CLI, and a long function with no reason
    "clipforge/report.py": "def show():\n    from clipforge.cli import main\n" + _body(60),
}


def test_checker_finds_exactly_the_planted_faults(tmp_path):
    _write(tmp_path, SYNTHETIC)
    edges = import_edges(tmp_path)
    assert {(e.src, e.dst) for e in edges} == {
        ("clipforge.cli", "clipforge.commands.run"),
        ("clipforge.commands.run", "clipforge.errors"),
        ("clipforge.model", "clipforge.model.clip"),
        ("clipforge.model.clip", "clipforge.errors"),
        ("clipforge.model.clip", "clipforge.checkpoints.load"),
        ("clipforge.checkpoints", "clipforge.checkpoints.load"),
        ("clipforge.checkpoints.load", "clipforge.data.shards"),
        ("clipforge.checkpoints.load", "clipforge.model.clip"),
        ("clipforge.data.shards", "clipforge.checkpoints"),
        ("clipforge.report", "clipforge.cli"),
    }
    assert import_cycles(edges) == [
        [
            "clipforge.checkpoints",
            "clipforge.checkpoints.load",
            "clipforge.data.shards",
            "clipforge.checkpoints",
        ],
        ["clipforge.checkpoints.load", "clipforge.model.clip", "clipforge.checkpoints.load"],
    ]
    bad = forbidden_imports(edges)
    assert [(e.src, e.dst, e.line) for e in bad] == [
        ("clipforge.model.clip", "clipforge.checkpoints.load", 7),
        ("clipforge.report", "clipforge.cli", 2),
    ]
    assert bad[0].file == "clipforge/model/clip.py"
    assert long_functions(tmp_path) == [
        "clipforge/errors.py:76 bare (71 lines)",
        "clipforge/report.py:1 show (62 lines)",
    ]
