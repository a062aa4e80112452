"""The layers, read from the code: every import of every module (module level and inside functions).

Bottom to top, each folder imports only from the folders below it (and itself):

1. ``fedpersona/``: config, model + adapters + split, wire format. Its entry points
   (``fedpersona/cli.py``, ``fedpersona/__main__.py``) are the only modules that may import above.
2. ``privacy/``: the library (ledger, noise, RDP, secure aggregation, the audit's math and report).
3. ``client/`` and ``server/``: the two sides; neither imports the other.
4. ``simulations/``: the runner's room (scenarios, corpus, runner, progress, the apps) and the cohort
   engine (``engine/``); above them its rooms ``bench/``, ``studies/``, ``audit/`` and ``deploy/``, which
   import the runner's room and the layers below, never each other.

Every folder installs under the one package ``fedpersona`` (``fedpersona.client`` is ``client/``, ...).
And no import cycle between modules.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"fedpersona": 0, "privacy": 1, "client": 2, "server": 2, "simulations": 3,
         "simulations.bench": 4, "simulations.studies": 4, "simulations.audit": 4, "simulations.deploy": 4}
ENTRY_POINTS = {"fedpersona.cli", "fedpersona.__main__"}
#: Folders of the same layer that must not import each other.
APART = {(a, b) for group in (("client", "server"), ("simulations.bench", "simulations.studies", "simulations.audit",
                                                    "simulations.deploy")) for a in group for b in group if a != b}
FOLDERS = ("client", "server", "privacy", "simulations")


def _module_name(path: Path) -> str:
    """The installed name: ``client/app.py`` is ``fedpersona.client.app``, ``fedpersona/cli.py`` ``fedpersona.cli``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] in FOLDERS:
        parts.insert(0, "fedpersona")
    return ".".join(parts)


@lru_cache(maxsize=1)
def modules() -> dict[str, Path]:
    out = {}
    for top in ("fedpersona", *FOLDERS):
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
    """The layer's folder of a module: ``fedpersona`` (the core), ``client``, ... or a room of ``simulations``."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in FOLDERS:
        return "fedpersona"
    room = ".".join(parts[1:3])
    return room if room in LAYER else parts[1]


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
    fake = {"fedpersona.client.fake": tmp_path / "fake.py",
            "fedpersona.simulations.corpus": ROOT / "simulations" / "corpus.py"}
    fake["fedpersona.client.fake"].write_text(
        "def f():\n    from fedpersona.simulations.corpus import load_users\n    return load_users\n")
    imports_of.cache_clear()
    monkeypatch.setattr(f"{__name__}.modules", lambda: fake)
    try:
        assert imports_of("fedpersona.client.fake") == (("fedpersona.simulations.corpus", 2, True),)
        assert any("imports fedpersona.simulations.corpus (inside a function)" in b for b in layer_violations())
    finally:
        imports_of.cache_clear()


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("import fedpersona.privacy.b\n")
    b.write_text("def f():\n    import fedpersona.privacy.a\n")
    monkeypatch.setattr(f"{__name__}.modules", lambda: {"fedpersona.privacy.a": a, "fedpersona.privacy.b": b})
    imports_of.cache_clear()
    try:
        assert import_cycles() == [["fedpersona.privacy.a", "fedpersona.privacy.b"]]
    finally:
        imports_of.cache_clear()


@pytest.mark.parametrize("top", sorted(LAYER))
def test_every_folder_is_read(top):
    assert any(_top(m) == top for m in modules())


def test_a_room_importing_another_room_is_caught(tmp_path, monkeypatch):
    """bench/ importing studies/ (two rooms of the same floor) is a violation; importing the runner's room is not."""
    fake = {"fedpersona.simulations.bench.fake": tmp_path / "fake.py",
            "fedpersona.simulations.studies.utility": ROOT / "simulations" / "studies" / "utility.py",
            "fedpersona.simulations.runner": ROOT / "simulations" / "runner.py"}
    fake["fedpersona.simulations.bench.fake"].write_text(
        "from fedpersona.simulations.runner import run\nfrom fedpersona.simulations.studies.utility import main\n")
    imports_of.cache_clear()
    monkeypatch.setattr(f"{__name__}.modules", lambda: fake)
    try:
        bad = [b for b in layer_violations() if "fake.py" in b]
        assert len(bad) == 1 and "imports fedpersona.simulations.studies.utility" in bad[0], bad
    finally:
        imports_of.cache_clear()


def test_one_top_level_name_is_installed():
    """pyproject installs the four folders inside the package fedpersona (no top-level client, server, ...)."""
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {p.partition(".")[0] for p in tool["packages"]} == {"fedpersona"}
    assert {f"fedpersona.{f}": f for f in FOLDERS}.items() <= tool["package-dir"].items()
    on_disk = {_module_name(p.parent) for top in FOLDERS for p in (ROOT / top).rglob("__init__.py")}
    assert on_disk <= set(tool["packages"]), sorted(on_disk - set(tool["packages"]))
