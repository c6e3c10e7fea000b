"""The layering of the serving code, checked on its source (ast, no imports executed):

- each layer imports only what it may (API -> engine -> sessions -> rules -> kernels);
- imports between project modules (function-level ones too) form no circle;
- nothing below the API layer knows HTTP: no web framework import, no status code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("server", "kernels", "models", "eval", "loadtests")

# layer -> project modules (and packages: a name ending in ".*" allows its submodules) it may import
ALLOWED = {
    "server.api": {"server", "server.api.*", "server.engine", "server.engine.messages", "server.engine.metrics",
                   "server.engine.remote",
                   "server.errors", "server.config", "server.keys", "models.config", "models.preprocess"},
    "server.engine": {"server", "server.engine.*", "server.sessions", "server.rules", "server.errors",
                      "server.config", "server.keys", "kernels", "models"},
    "server.sessions": {"server.sessions.*", "server.rules", "server.errors", "server.keys", "kernels"},
    "server.rules": {"server.rules.*", "server.errors", "kernels"},
    "server.errors": set(),
    "server.keys": set(),
    "server.config": set(),
    "server.logs": set(),
    "server.client": {"server.api.schemas", "server.client_codec", "server.client_history"},
    "server.client_codec": {"server.api.schemas"},
    "server.client_history": {"server.api.schemas"},
    "kernels": {"kernels.*"},
    "models": {"models.*"},
}
# thin shims that keep old commands working (`python -m kernels.bench`); the tools live in loadtests/
SHIMS = {"kernels.bench", "kernels.gpu_check", "kernels.aot_check"}
BELOW_API = ("server.engine", "server.sessions", "server.rules", "kernels")
WEB = ("fastapi", "starlette", "http", "uvicorn", "httpx")
STATUSES = {400, 401, 403, 404, 405, 409, 413, 415, 422, 429, 500, 502, 503, 504}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            out[module_name(path)] = path
    return out


def imports(name: str, path: Path, top_level_only: bool = False) -> set[str]:
    """Project modules this module imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            found.add(mod)
            # `from package import submodule` imports the submodule
            for a in node.names:
                found.add(f"{mod}.{a.name}")
    known = sources()
    return {m for m in found if m in known and m != name}


def layer_of(name: str) -> str | None:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if name == layer or name.startswith(layer + "."):
            return layer
    return None


def allowed(target: str, rules: set[str], layer: str) -> bool:
    if target == layer or target.startswith(layer + "."):
        return True
    for r in rules:
        if r.endswith(".*") and (target == r[:-2] or target.startswith(r[:-1])):
            return True
        if target == r:
            return True
    return False


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_what_it_may(layer):
    bad = []
    for name, path in sources().items():
        if layer_of(name) != layer or name in SHIMS:
            continue
        for target in imports(name, path):
            # a module's own package __init__ is part of it
            if not allowed(target, ALLOWED[layer], layer):
                bad.append(f"{name} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    known = sources()
    graph = {n: imports(n, p) for n, p in known.items()}
    # importing a package imports its __init__: a submodule that imports its parent package at
    # top level while the parent imports it back is the circle Python reports as a partial import
    state: dict[str, int] = {}
    circles = []

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in graph.get(n, ()):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m] if m in stack else [n, m]
                if not _parent_package_edge(cycle):
                    circles.append(" -> ".join(cycle))
            elif m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not circles, "\n".join(circles)


def _parent_package_edge(cycle: list[str]) -> bool:
    """A package's __init__ importing its own submodules, which import siblings via the package
    namespace, is how packages are built, not a circle between modules."""
    return any(b.startswith(a + ".") or a.startswith(b + ".") for a, b in zip(cycle, cycle[1:]))


@pytest.mark.parametrize("layer", BELOW_API)
def test_nothing_below_the_api_knows_http(layer):
    bad = []
    for name, path in sources().items():
        if not (name == layer or name.startswith(layer + ".")):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                bad += [f"{name} imports {m}" for m in mods if m.split(".")[0] in WEB]
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                    and node.args[0].value in STATUSES:
                bad.append(f"{name}:{node.lineno} calls with {node.args[0].value} first (an HTTP status)")
            elif isinstance(node, ast.keyword) and node.arg in ("status", "status_code"):
                bad.append(f"{name}:{node.lineno} passes {node.arg}=")
    assert not bad, "\n".join(bad)


def test_no_module_in_server_is_a_god_object():
    sizes = {name: len(path.read_text().splitlines()) for name, path in sources().items()
             if name.startswith("server.")}
    assert max(sizes.values()) < 520, max(sizes.items(), key=lambda kv: kv[1])
