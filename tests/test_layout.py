"""The package's layout rules, checked on the source: which part may import which, and no cycles.

- ``student/`` (the data plane) never imports ``teacher/``;
- ``teacher/`` (the server) imports neither ``student/`` nor ``discovery/``;
- ``discovery/`` (the control plane) imports neither ``student/`` nor ``teacher/``;
- the ground floor (the modules directly in ``zdistill/`` that both sides use) imports none
  of the three, nor the front door (``reader``) or the command line (``cli``);
- no module imports ``cli`` (a command-line module is an entry point, not a library);
- no import cycle between modules, imports inside functions included.

Imports are read with :mod:`ast`, so an import deferred into a function counts as much as
one at the top: a rule that holds only until a function runs is not a rule.
"""

from __future__ import annotations

import ast
import pathlib
from collections.abc import Iterator

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "zdistill"
PARTS = ("student", "teacher", "discovery")
GROUND = ("spec", "wire", "teacher_messages", "errors", "security", "flags", "metrics", "client", "topk",
          "triton_address", "triton_client",
          "fingerprint")
FORBIDDEN = {
    "student": ("teacher",),
    "teacher": ("student", "discovery"),
    "discovery": ("student", "teacher"),
    **{name: (*PARTS, "reader", "cli") for name in GROUND},
}


def modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Every module under ``root`` (the package folder) by dotted name."""
    found = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: pathlib.Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """The package's modules that ``name`` imports, anywhere in its file, with the line."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod where there is one, else names of pkg
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target not in known and "." in target:  # import a.b.c of a package's module
                target = target.rpartition(".")[0]
            if target in known and target != name:
                yield target, node.lineno


def area(module: str) -> str | None:
    """The rule area of a module: its part, or its own name on the ground floor."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def broken_rules(root: pathlib.Path) -> list[str]:
    """Every import under ``root`` that breaks a rule of the module docstring, in words."""
    found = modules(root)
    known = set(found)
    graph: dict[str, set[str]] = {name: set() for name in found}
    broken = []
    for name, path in sorted(found.items()):
        for target, line in imports(name, path, known):
            graph[name].add(target)
            here, there = area(name), area(target)
            if there == "cli":
                broken.append(f"{path.name}:{line}: {name} imports the command line {target}")
            elif here in FORBIDDEN and there in FORBIDDEN[here] and not (here in PARTS and here == there):
                broken.append(f"{path.relative_to(root.parent)}:{line}: {name} imports {target}")
    broken += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return broken


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_the_package_keeps_its_layout_rules():
    assert broken_rules(PACKAGE) == []


def test_each_part_is_a_folder_and_the_ground_floor_is_beside_them():
    names = set(modules(PACKAGE))
    assert {f"zdistill.{part}" for part in PARTS} <= names
    assert {f"zdistill.{name}" for name in GROUND} <= names
    flat = {n for n in names if n.count(".") == 1} - {f"zdistill.{p}" for p in PARTS}
    assert flat <= {f"zdistill.{n}" for n in (*GROUND, "reader", "cli")}, f"modules of no part: {sorted(flat)}"


@pytest.mark.parametrize(("files", "want"), [
    ({"student/a.py": "def f():\n    from zdistill.teacher import b\n", "teacher/b.py": ""},
     "zdistill.student.a imports zdistill.teacher.b"),
    ({"wire.py": "from zdistill.discovery.c import x\n", "discovery/c.py": "x = 1\n"},
     "zdistill.wire imports zdistill.discovery.c"),
    ({"student/a.py": "from zdistill.cli import main\n", "cli.py": ""}, "imports the command line zdistill.cli"),
    ({"teacher/a.py": "from . import b\n", "teacher/b.py": "def f():\n    from zdistill.teacher.a import g\n"},
     "import cycle: zdistill.teacher.a -> zdistill.teacher.b"),
])
def test_the_check_finds_a_broken_rule(tmp_path, files, want):
    """The check itself: deferred imports, the ground floor, the command line and cycles are seen."""
    root = tmp_path / "zdistill"
    for rel, text in {"__init__.py": "", **{f"{p}/__init__.py": "" for p in PARTS}, **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    assert any(want in line for line in broken_rules(root)), broken_rules(root)
