"""The layers, read from the code: every import of every module (module level and inside functions).

Bottom to top, each folder imports only from the folders below it (and itself):

1. ``fedpersona/``: config, model + adapters + split, wire format. Its entry points
   (``fedpersona/cli.py``, ``fedpersona/__main__.py``) are the only modules that may import above.
2. ``privacy/``: the library (ledger, noise, RDP, secure aggregation, the audit's math and report).
3. ``client/`` and ``server/``: the two sides; neither imports the other.
4. ``simulations/``: scenarios, corpus, runner, the audit experiment, benchmarks, the rehearsal.

And no import cycle between modules.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"fedpersona": 0, "privacy": 1, "client": 2, "server": 2, "simulations": 3}
ENTRY_POINTS = {"fedpersona.cli", "fedpersona.__main__"}
#: Folders of the same layer that must not import each other.
APART = {("client", "server"), ("server", "client")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@lru_cache(maxsize=1)
def modules() -> dict[str, Path]:
    out = {}
    for top in LAYER:
        for path in sorted((ROOT / top).rglob("*.py")):
            out[_module_name(path)] = path
    return out


def _resolve(name: str) -> str | None:
    """The project module ``name`` refers to (itself, or the package holding it), or None if it is not ours."""
    known = modules()
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


@lru_cache(maxsize=None)
def imports_of(module: str) -> tuple[tuple[str, int, bool], ...]:
    """(imported project module, line, inside a function) for every import statement of ``module``."""
    path = modules()[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for inner in ast.walk(node):
                if inner is not node:
                    in_function.add(id(inner))
    out = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # ``from pkg import sub`` imports the submodule when there is one.
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules() else stem for a in node.names]
        for target in targets:
            resolved = _resolve(target)
            if resolved is not None and resolved != module:
                out.append((resolved, node.lineno, id(node) in in_function))
    return tuple(out)


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _top(module: str) -> str:
    return module.partition(".")[0]


def layer_violations() -> list[str]:
    bad = []
    for module in modules():
        if module in ENTRY_POINTS:
            continue
        src = _top(module)
        for target, line, inside in imports_of(module):
            dst = _top(target)
            if LAYER[dst] > LAYER[src] or (src, dst) in APART:
                where = "inside a function" if inside else "module level"
                bad.append(f"{_shown(modules()[module])}:{line} imports {target} ({where})")
    return bad


def import_cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph = {m: sorted({t for t, _, _ in imports_of(m)}) for m in modules()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_every_folder_imports_only_from_the_layers_below():
    assert layer_violations() == []


def test_no_import_cycle():
    assert import_cycles() == []


def test_the_reader_sees_imports_inside_functions(tmp_path, monkeypatch):
    # The check must be able to fail: an import of simulations inside a function of client/ is caught.
    fake = {"client.fake": tmp_path / "fake.py", "simulations.corpus": ROOT / "simulations" / "corpus.py"}
    fake["client.fake"].write_text("def f():\n    from simulations.corpus import load_users\n    return load_users\n")
    imports_of.cache_clear()
    monkeypatch.setattr(f"{__name__}.modules", lambda: fake)
    try:
        assert imports_of("client.fake") == (("simulations.corpus", 2, True),)
        assert any("imports simulations.corpus (inside a function)" in b for b in layer_violations())
    finally:
        imports_of.cache_clear()


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import privacy.b\n")
    b.write_text("def f():\n    import privacy.a\n")
    monkeypatch.setattr(f"{__name__}.modules", lambda: {"privacy.a": a, "privacy.b": b})
    imports_of.cache_clear()
    try:
        assert import_cycles() == [["privacy.a", "privacy.b"]]
    finally:
        imports_of.cache_clear()


@pytest.mark.parametrize("top", sorted(LAYER))
def test_every_folder_is_read(top):
    assert any(_top(m) == top for m in modules())
