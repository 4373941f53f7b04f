"""Import layers, read from the source (ast, nothing imported): every import points down.

    yan_kernels (kernels/)  imports nothing from yan_serve, and its own modules only relatively
    config, device, tokenizer, flow  <  model  <  engine, weights  <  tasks  <  train  <  ar
        <  server
    everything else (cli, bench, convert, experiments, __main__) sits on top

Imports inside functions count: a lazy import is still a dependency.

Run: python -m pytest -q tests/test_layers.py
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RANK = {
    "config": 0,
    "device": 0,
    "tokenizer": 0,
    "flow": 0,
    "model": 1,
    "engine": 2,
    "weights": 2,
    "tasks": 3,
    "train": 4,
    "ar": 5,
    "server": 6,
}
TOP = max(RANK.values()) + 1  # the applications: cli, bench, convert, experiments, __main__

# Upward imports that remain, each with the reason it cannot point down yet.
EXCEPTIONS: set[tuple[str, str]] = set()


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path = ROOT) -> list[tuple[str, int]]:
    """(absolute module name, level) of every import in the file; relative ones resolved."""
    package = _module_name(path, root)
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, 0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
                found.append((name, node.level))
            else:
                found.append((node.module or "", 0))
    return found


def _rank(module: str) -> int:
    parts = module.split(".")
    return RANK.get(parts[1], TOP) if len(parts) > 1 else TOP


def upward_imports(root: Path = ROOT) -> set[tuple[str, str]]:
    """(importer, imported) for every yan_serve import that points to a higher layer."""
    bad = set()
    for path in sorted((root / "yan_serve").rglob("*.py")):
        importer = _module_name(path, root)
        for name, _ in _imports(path, root):
            if not name.startswith("yan_serve."):
                continue
            same = name.split(".")[:2] == importer.split(".")[:2]
            if not same and _rank(name) > _rank(importer):
                bad.add((importer, name))
    return bad


def test_kernels_is_a_closed_layer() -> None:
    """kernels/ imports nothing from yan_serve, and reaches its own modules relatively (so the
    folder also imports under its directory name, tests/kernels/test_import_name.py)."""
    bad = []
    for path in sorted((ROOT / "kernels").rglob("*.py")):
        for name, level in _imports(path):
            top = name.split(".")[0]
            if top == "yan_serve" or (top == "yan_kernels" and level == 0):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_imports_point_down() -> None:
    bad = upward_imports() - EXCEPTIONS
    assert not bad, "\n".join(f"{a} imports {b}" for a, b in sorted(bad))


def test_exceptions_are_still_needed() -> None:
    """An exception that no longer occurs must leave the list."""
    assert upward_imports() >= EXCEPTIONS


def test_the_check_sees_an_upward_import(tmp_path) -> None:
    """A model module importing the server, even inside a function, is caught."""
    pkg = tmp_path / "yan_serve" / "model"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("def f():\n    from yan_serve.server import app\n")
    (pkg / "y.py").write_text("from ..engine import sampler\n")
    (pkg / "z.py").write_text("from yan_serve.model import layers\nimport yan_serve.flow\n")
    assert upward_imports(tmp_path) == {
        ("yan_serve.model.x", "yan_serve.server"),
        ("yan_serve.model.y", "yan_serve.engine"),
    }
