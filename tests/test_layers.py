"""The package's architecture, checked: every module sits in a room of the layer table
(docs/architecture.md), imports only from its layer or below, and no two modules import each other,
directly or through others. Imports are read from the source (every ``import`` statement, at the
top or inside a function), so a cycle hidden behind a function-level import is found too."""

import ast
from pathlib import Path

import editfast

PKG = Path(editfast.__file__).parent

# room -> layer; a module imports only from rooms of its layer or below
LAYERS = {
    "editfast.core": 1, "editfast.kernels": 1,
    "editfast.models": 2,
    "editfast.data": 3,
    "editfast.engine": 4,
    "editfast.methods": 5,
    "editfast.eval": 6,
    "editfast.session": 7,
    "editfast.api": 8, "editfast.easyedit": 8, "editfast.harness": 8, "editfast.cli": 8,
    "editfast": 8, "editfast.__main__": 8,
}
FRONT = {"__init__.py", "__main__.py", "api.py", "easyedit.py", "harness.py"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py") if "_data" not in p.parts}


def room(mod: str) -> str:
    best = max((r for r in LAYERS if mod == r or mod.startswith(r + ".")), key=len)
    return best


def imports(mod: str) -> set[str]:
    """editfast modules that ``mod`` imports (``from pkg import sub`` counts as pkg.sub)."""
    path = MODULES[mod]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "editfast"}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{mod}: relative import (line {node.lineno}); editfast imports are absolute"
            if (node.module or "").split(".")[0] != "editfast":
                continue
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in MODULES else node.module)
    return out - {mod}


def test_every_module_is_in_a_room():
    loose = sorted(p.name for p in PKG.glob("*.py") if p.name not in FRONT)
    assert not loose, f"modules at the top of editfast/ outside the rooms: {loose}"
    for mod in MODULES:
        assert room(mod) in LAYERS, mod


def test_no_import_goes_up_a_layer():
    bad = []
    for mod in MODULES:
        for dep in imports(mod):
            if dep not in MODULES:
                continue
            if LAYERS[room(dep)] > LAYERS[room(mod)]:
                bad.append(f"{mod} (layer {LAYERS[room(mod)]}) imports {dep} (layer {LAYERS[room(dep)]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {m: {d for d in imports(m) if d in MODULES} for m in MODULES}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_layer_table_is_written_down():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text()
    for r in LAYERS:
        if r not in ("editfast", "editfast.__main__"):
            assert f"`{r.removeprefix('editfast.')}" in doc, r


def test_function_level_imports_say_why():
    """Imports sit at the top; one inside a function is for an optional or heavy third-party package
    (or keeps torch out of ``editfast --help``) and says so on its line or the line above. None of them
    imports editfast, except the CLI group's, which runs after its command module loaded torch."""
    bad = []
    for mod, path in MODULES.items():
        text = path.read_text()
        tree, lines = ast.parse(text), text.split("\n")
        top = {id(n) for n in tree.body}
        for node in tree.body:
            if isinstance(node, (ast.Try, ast.If)):
                top |= {id(x) for x in ast.walk(node)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top:
                continue
            name = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            said = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
            if name.split(".")[0] == "editfast" and mod != "editfast.cli" or not said:
                bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not bad, "function-level imports without a reason (or of editfast):\n" + "\n".join(bad)
