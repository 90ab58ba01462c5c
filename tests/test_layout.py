"""The house keeps its shape: no import circle between files, transports only inside comm/, launch/ without torch,
the README's layout naming every module, and no library file over budget without a reason at its top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "distrib"
BUDGET = 300  # lines a library file may have; longer ones say why in their docstring, naming this budget
# ddp/ and hooks.py may import the torch interfaces a drop-in implements (Join's Joinable and JoinHook, the comm hooks'
# types); they never start or call a group themselves.
DDP_INTERFACES = ("torch.distributed.algorithms",)
DDP_MODULES = ("distrib.ddp", "distrib.hooks")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(top: Path) -> dict[str, Path]:
    return {module_name(p): p for p in sorted(top.rglob("*.py"))}


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code: `from a import b` names a.b when b is a module."""
    known = modules(LIBRARY)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(known)
            found.update(submodules or {node.module})
            if len(submodules) < len(node.names):
                found.add(node.module)
    return found


def graph() -> dict[str, set[str]]:
    mine = modules(LIBRARY)
    return {name: {m for m in imports(path) if m in mine and m != name} for name, path in mine.items()}


def test_no_import_circle_between_files():
    edges, cycles = graph(), []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for nxt in sorted(edges[name]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


@pytest.mark.parametrize("library", ["mpi4py", "torch.distributed"])
def test_only_comm_touches_the_transports(library):
    offenders = []
    for name, path in modules(LIBRARY).items():
        if name.startswith("distrib.comm"):
            continue
        for imported in imports(path):
            if imported == library or imported.startswith(library + "."):
                if name.startswith(DDP_MODULES) and imported.startswith(DDP_INTERFACES):
                    continue
                offenders.append(f"{name} imports {imported}")
    assert not offenders, offenders


def test_comm_imports_nothing_else_of_distrib():
    outside = [
        f"{name} imports {m}"
        for name, path in modules(LIBRARY).items()
        if name.startswith("distrib.comm")
        for m in imports(path)
        if (m == "distrib" or m.startswith("distrib.")) and not m.startswith("distrib.comm")
    ]
    assert not outside, outside


def test_launch_imports_neither_torch_nor_distrib():
    offenders = [
        f"{name} imports {m}"
        for name, path in modules(ROOT / "launch").items()
        for m in imports(path)
        if m.split(".")[0] in ("torch", "distrib")
    ]
    assert not offenders, offenders


def readme_layout() -> set[str]:
    """The files the README's layout block names: lines indented two spaces a level, folders ending in "/", then
    the files of a line (several may share one), then what they do."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Layout") :].split("```")[1]
    folders: list[str] = []
    named = set()
    for line in block.splitlines():
        if not line.strip():
            continue
        words, level = line.split(), (len(line) - len(line.lstrip())) // 2
        folders = folders[:level]
        if words[0].endswith("/"):
            folders.append(words[0].rstrip("/"))
            continue
        for word in words:
            if not word.endswith(".py"):
                break
            named.add("/".join([*folders, word]))
    return named


def test_readme_layout_names_every_module_and_only_those():
    named = {name for name in readme_layout() if name.startswith("distrib/") and not name.endswith("__init__.py")}
    files = {str(p.relative_to(ROOT)) for p in LIBRARY.rglob("*.py") if p.name != "__init__.py"}
    assert files - named == set(), f"modules the README's layout does not name: {sorted(files - named)}"
    assert named - files == set(), f"the README's layout names files that do not exist: {sorted(named - files)}"


def test_library_files_keep_to_the_budget_or_say_why():
    over = []
    for path in sorted(LIBRARY.rglob("*.py")):
        lines = len(path.read_text().splitlines())
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > BUDGET and f"{BUDGET}-line budget" not in docstring:
            over.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not over, over
