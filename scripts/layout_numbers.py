"""Numbers that say how the package is laid out: modules, the largest one, lens-kind branches outside the kind
registry, copies of the corpus loop, import cycles (function-level imports included).

Run from a checkout: `python scripts/layout_numbers.py [--json]`. tests/test_imports.py uses `import_graph` and
`cycles` from here to assert that the package has no import cycle.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "attention_lens"
KIND_BRANCH = re.compile(r"kind ==|kind in \(|kind !=")
"""The issue's grep: `grep -rn 'kind ==\\|kind in (\\|kind !=' attention_lens`."""
CORPUS_LOOP = re.compile(r"\btoken_windows\(")
"""Each corpus loop cuts documents into windows itself; one call outside data.py is one copy of the loop."""


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package."""
    base = root / PACKAGE
    found = {}
    for path in sorted(base.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file (top level, functions, TYPE_CHECKING too)."""
    files = module_files(root)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.module, node.level)
                for alias in node.names:  # `from . import hub` lands in hub; `from . import X` of a name, in base
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base)
        graph[name] = {_owner(t, files) for t in targets if _owner(t, files) not in (None, name)}
    return graph


def _resolve(module: str, is_package: bool, target: str | None, level: int) -> str:
    if level == 0:
        return target or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([target] if target else []))


def _owner(target: str, files: dict[str, Path]) -> str | None:
    """The package module an import lands in (`attention_lens.lens.Lens` -> `attention_lens.lens`)."""
    parts = target.split(".")
    while parts:
        if ".".join(parts) in files:
            return ".".join(parts)
        parts.pop()
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan): each is at least one import cycle.

    A package's `__init__` importing its own submodules is not a cycle Python trips on, as long as the submodules
    do not import the `__init__` back; so edges from a package to its own submodules count like any other.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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


def numbers(root: Path = ROOT) -> dict:
    files = module_files(root)
    lines = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in files.items()}
    largest = max(lines, key=lines.get)
    texts = {name: path.read_text(encoding="utf-8") for name, path in files.items()}
    kind_sites = [f"{name}:{number}" for name, text in texts.items()
                  for number, line in enumerate(text.splitlines(), start=1) if KIND_BRANCH.search(line)]
    loops = [f"{name}:{number}" for name, text in texts.items() if not name.endswith(".data")
             for number, line in enumerate(text.splitlines(), start=1) if CORPUS_LOOP.search(line)]
    found = cycles(import_graph(root))
    return {"modules": len(files), "lines": sum(lines.values()), "largest_module": largest,
            "largest_module_lines": lines[largest], "kind_branch_sites": len(kind_sites),
            "kind_branch_where": kind_sites, "corpus_loop_copies": len(loops), "corpus_loop_where": loops,
            "import_cycles": len(found), "cycle_groups": found}


def main(argv: list[str]) -> int:
    root = Path(argv[argv.index("--root") + 1]) if "--root" in argv else ROOT
    result = numbers(root)
    if "--json" in argv:
        print(json.dumps(result, indent=1))
        return 0
    for key, value in result.items():
        print(f"{key:>22}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
