"""The layering, read from the source: no import circles, and the library never imports a shell.

Every import of every module under platform/rewardprism, serve_apps and tune (and the root entry scripts) is
read with `ast`, at module level and inside functions alike: a lazy import is still a dependency, and a circle
of lazy imports is still a circle. Three layers (README, "Layout"):

- core: plain functions and classes over tensors, arrays and files. It imports only the core and no Ray, HTTP,
  database or command-line package, so it runs (and is tested) without any of them.
- Ray library: the same work spread over a Ray cluster (Ray Data, Ray tasks, Ray Train + DeepSpeed) and the
  training recipes. It imports the core and Ray, never a shell.
- shells: what a person or a service runs — the `rewardprism` CLI (cli*.py), the demo (an entry point: it
  starts the Serve app of serve_apps and a store), the store, the Serve apps (serve_apps/), the Tune sweeps
  (tune/) and the root scripts train_vrm.py / train_drm.py. Shells import the library and each other.

A new module must be placed in one of them here: the test fails on a module it cannot classify.
"""
from __future__ import annotations

import ast
import fnmatch
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CORE = {
    "rewardprism", "rewardprism.bounds", "rewardprism.config", "rewardprism.data", "rewardprism.sources",
    "rewardprism.synthetic", "rewardprism.backbone", "rewardprism.features", "rewardprism.embed", "rewardprism.heads",
    "rewardprism.drm", "rewardprism.adapt", "rewardprism.select",
    "rewardprism.protocol", "rewardprism.calibrate", "rewardprism.evaluate", "rewardprism.vrm",
    "rewardprism.scoring", "rewardprism.train_data", "rewardprism.train_eval", "rewardprism.migrate_profiles",
    "rewardprism.cards",
}
RAY_LIBRARY = {
    "rewardprism.embed_ray", "rewardprism.drm_ray", "rewardprism.train_worker", "rewardprism.recipes",
    "rewardprism.recipes.drm", "rewardprism.recipes.vrm",
}
SHELLS = ("rewardprism.cli", "rewardprism.cli_*", "rewardprism.demo", "rewardprism.store", "rewardprism.store.*",
          "serve_apps", "serve_apps.*", "tune.*", "train_vrm", "train_drm")
# What the core never imports: Ray and DeepSpeed, HTTP, databases, command lines, training logs.
NOT_IN_CORE = {"ray", "deepspeed", "fastapi", "starlette", "uvicorn", "httpx", "sqlalchemy", "alembic", "psycopg",
               "pydantic_settings", "typer", "tensorboardX"}


def modules(root: Path) -> dict[str, Path]:
    """Module name → file: rewardprism.* and serve_apps.* as packages, tune.* (scripts that import each other
    as siblings: `from sweeps import ...`), and the root scripts."""
    found = {}
    for base, folder in ((root / "platform", root / "platform" / "rewardprism"), (root, root / "serve_apps")):
        for path in folder.rglob("*.py"):
            parts = path.relative_to(base).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    found.update({f"tune.{p.stem}": p for p in (root / "tune").glob("*.py")})
    found.update({p.stem: p for p in root.glob("train_*.py")})
    return found


def imports(name: str, path: Path, known: set[str]) -> Iterable[tuple[str, int]]:
    """(imported name, line) for every import in the file: an internal module's name when it is one, else the
    top-level package (`ray`, `numpy`, ...)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the importing module's package
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module
            if name.startswith("tune.") and f"tune.{module}" in known:  # a sweep script's sibling
                module = f"tune.{module}"
            # `from package import submodule` depends on the submodule; `from module import name` on the module
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            if name.startswith("tune.") and f"tune.{target}" in known:
                target = f"tune.{target}"
            while target not in known and "." in target:  # `import ray.train` → ray; a.b.name → a.b
                target = target.rpartition(".")[0]
            yield target, node.lineno


def graph(root: Path) -> tuple[dict[str, Path], dict[str, dict[str, int]]]:
    """Modules and, for each, what it imports (internal modules and external top-level packages) → first line."""
    found = modules(root)
    edges: dict[str, dict[str, int]] = {}
    for name, path in found.items():
        edges[name] = {}
        for target, line in imports(name, path, set(found)):
            if target != name:
                edges[name].setdefault(target, line)
    return found, edges


def circles(nodes: Iterable[str], edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges.get(node, {}):
            if target not in edges:
                continue  # external
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(nodes):
        if node not in index:
            visit(node)
    return found


def layer(name: str) -> str | None:
    if name in CORE:
        return "core"
    if name in RAY_LIBRARY:
        return "ray library"
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in SHELLS):
        return "shell"
    return None


def violations(root: Path) -> list[str]:
    """Every broken rule, one line each, naming the file and line of the import."""
    found, edges = graph(root)
    problems = [f"import circle: {' ↔ '.join(c)}" for c in circles(found, edges)]
    for name, targets in sorted(edges.items()):
        where = found[name].relative_to(root)
        kind = layer(name)
        if kind is None:
            problems.append(f"{where}: not placed in a layer (add {name} to CORE, RAY_LIBRARY or SHELLS here)")
            continue
        for target, line in sorted(targets.items()):
            if kind != "shell" and target in found and layer(target) == "shell":
                problems.append(f"{where}:{line}: the {kind} imports the shell {target}")
            if kind == "core" and target in found and layer(target) != "core":
                problems.append(f"{where}:{line}: the core imports {target} ({layer(target)})")
            if kind == "core" and target in NOT_IN_CORE:
                problems.append(f"{where}:{line}: the core imports {target}")
    return problems


def test_no_import_circles_and_the_library_never_imports_a_shell():
    assert violations(ROOT) == []


def test_the_reader_sees_lazy_imports_and_resolves_every_kind_of_name():
    """The checks read what they claim to read: function-level imports, packages and their submodules,
    relative imports and the sweep scripts' siblings."""
    found, edges = graph(ROOT)
    assert {"rewardprism.cli", "rewardprism.store", "serve_apps.app", "tune.sweeps", "train_vrm"} <= set(found)
    assert "rewardprism.heads" in edges["rewardprism.scoring"]
    assert "ray" in edges["rewardprism.drm_ray"]  # imported inside `decompose_folder`
    assert "tune.sweeps" in edges["tune.sweep_drm"]
    assert "serve_apps.local" in edges["rewardprism.demo"]  # the demo is an entry point


def test_the_checks_catch_a_circle_and_a_library_module_that_imports_a_shell(tmp_path):
    """A planted tree: core `data` imports the CLI inside a function, the CLI imports `data` back, a core module
    imports Ray, and two sweep scripts import each other."""
    package = tmp_path / "platform" / "rewardprism"
    package.mkdir(parents=True)
    (tmp_path / "serve_apps").mkdir()
    (tmp_path / "tune").mkdir()
    (package / "__init__.py").write_text("")
    (package / "data.py").write_text("def f():\n    from rewardprism.cli import fail\n")
    (package / "cli.py").write_text("from rewardprism import data\n")
    (package / "embed.py").write_text("import ray.data\n")
    (tmp_path / "tune" / "sweeps.py").write_text("def finish():\n    from report import render\n")
    (tmp_path / "tune" / "report.py").write_text("from sweeps import BEST\n")
    problems = violations(tmp_path)
    assert "import circle: rewardprism.cli ↔ rewardprism.data" in problems
    assert "import circle: tune.report ↔ tune.sweeps" in problems
    assert any(p.startswith("platform/rewardprism/data.py:2: the core imports the shell rewardprism.cli")
               for p in problems), problems
    assert any(p.startswith("platform/rewardprism/embed.py:1: the core imports ray") for p in problems), problems
