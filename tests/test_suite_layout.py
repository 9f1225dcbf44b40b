"""The test suite's own layout: a test module imports no other test module (shared fixtures are in
conftest.py, shared helpers in tests/helpers/), and bench/ imports no test module."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_no_module_imports_a_test_module():
    """Not a module of tests/ (``test_x``, ``tests.x``, ``conftest``), from tests/ or bench/; tests/
    imports nothing of bench/ either (bench/'s own modules import each other)."""
    bad = []
    for folder, also in (("tests", ("bench",)), ("bench", ())):
        for p in sorted((ROOT / folder).rglob("*.py")):
            for name in imported(p):
                top = name.split(".")[0]
                if top.startswith("test_") or top in ("tests", "conftest", *also):
                    bad.append(f"{p.relative_to(ROOT)}: {name}")
    assert not bad, bad
