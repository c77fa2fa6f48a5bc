"""The code passes its own linters: ruff (rules in pyproject.toml) and mypy --strict on mqttalk/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_ruff_finds_nothing() -> None:
    proc = subprocess.run(
        [str(BIN / "ruff"), "check", "mqttalk", "broker", "tests", "bench"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format_would_change_nothing() -> None:
    proc = subprocess.run(
        [str(BIN / "ruff"), "format", "--check", "mqttalk", "broker", "tests", "bench"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict_finds_nothing() -> None:
    proc = subprocess.run([str(BIN / "mypy")], cwd=ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# The map of mqttalk/__init__.py, top row first: a module imports only from its own row or the rows below.
LAYERS = [
    {"__init__", "__main__", "_entry"},
    {"cli", "_mcp", "_hook", "_install", "_guide", "_demo", "_handoff_server", "_watch", "_web"},
    {"_render", "_view", "_transcript"},
    {"_api"},
    {"_channel"},
    {"_live"},
    {"_outbox"},
    {"_peer"},
    {
        "_store",
        "_transport",
        "_wire",
        "_topics",
        "_seal",
        "_url",
        "_config",
        "_locks",
        "_bindings",
        "_embedded",
        "_input",
        "_since",
        "_state",
        "_handoff",
        "_spec",
    },
    {"_errors", "_version", "errors"},
]


def _imports() -> dict[str, set[str]]:
    """Each module of mqttalk/ and the modules of mqttalk/ it imports (anywhere in it: lazy imports and
    type-only ones count, a lazy import upward is still an arrow running back up)."""
    import ast

    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / "mqttalk").glob("*.py")):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mqttalk"):
                deps |= {node.module.split(".")[1]} if "." in node.module else {a.name for a in node.names}
        graph[path.stem] = deps - {path.stem}
    return graph


def test_the_import_graph_points_down_the_map_and_has_no_circle() -> None:
    graph = _imports()
    row = {name: i for i, names in enumerate(LAYERS) for name in names}
    assert set(graph) == set(row), "a module is missing from the map (LAYERS here, the table in mqttalk/__init__.py)"
    upward = [(m, d) for m, deps in graph.items() for d in deps if row[d] < row[m]]
    assert not upward, f"imports running back up the map: {upward}"

    def circle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for dep in graph[node]:
                if dep == start:
                    return [*path, dep]
                if dep not in path:
                    stack.append((dep, [*path, dep]))
        return None

    circles = [c for m in graph if (c := circle_from(m))]
    assert not circles, f"import circles: {circles[:3]}"
