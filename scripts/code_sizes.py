"""Modules over 400 / 500 lines and functions over 60 lines under a source folder.

Usage: ``python scripts/code_sizes.py [SRC]`` (default ``src``). A function's length runs
from its ``def`` line to its last line (docstring included); methods and nested functions
count on their own. Compare two commits with ``git archive REV src | tar -x -C DIR``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def main(root: Path) -> None:
    modules: list[tuple[int, str]] = []
    functions: list[tuple[int, str]] = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        name = str(path.relative_to(root))
        modules.append((len(text.splitlines()), name))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > 60:
                    functions.append((length, f"{name}:{node.lineno} {node.name}"))
    print(f"modules: {len(modules)}, lines: {sum(n for n, _ in modules)}")
    print(f"over 500 lines: {sum(n > 500 for n, _ in modules)}")
    print(f"over 400 lines: {sum(n > 400 for n, _ in modules)}")
    for lines, name in sorted(modules, reverse=True):
        if lines > 400:
            print(f"  {lines:5d} {name}")
    print(f"functions over 60 lines: {len(functions)}")
    for lines, name in sorted(functions, reverse=True):
        print(f"  {lines:5d} {name}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "src"))
