"""The import layers of the library (docs/ARCHITECTURE.md): arrows point down only, no cycles, no bundle paths.

Every ``import`` / ``from ... import`` statement of ``common/meduet`` is read with ``ast`` (at module level *and*
inside functions, so a dependency cannot hide in a function body), and checked against the layer table below.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[2] / "common" / "meduet"

#: package -> packages of ours it must not import (directly, at any level of the file)
FORBIDDEN = {
    "errors": {"*"},
    "io": {"*"},
    "records": {"*"},
    "latent": {"*"},
    "integrity": {"*"},
    "data": {"networks", "losses", "metrics", "engines", "workflows", "deploy", "records", "latent"},
    "networks": {"data", "losses", "metrics", "engines", "workflows", "deploy"},
    "losses": {"data", "metrics", "engines", "workflows", "deploy"},
    "metrics": {"engines", "workflows", "deploy"},
    "engines": {"workflows", "deploy"},
    "deploy": {"engines", "workflows"},
    "workflows": {"deploy"},
}
#: what the bottom modules may import of ours (everything else of ours is forbidden for them)
#: (``integrity``: the packaged-bundle check, standard library only, which ``records`` runs before reading a
#: checkpoint of a packaged bundle)
BOTTOM_ALLOWED = {"errors": set(), "io": set(), "integrity": {"errors"}, "records": {"errors", "io", "integrity"},
                  "latent": {"errors", "io"}}

#: imports of ours that stay inside a function, with the reason (a dependency never hides there otherwise)
FUNCTION_LEVEL_ALLOWED = {
    ("meduet", "meduet.integrity"): "only a packaged (vendored) copy verifies its bundle when imported",
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(LIB.rglob("*.py")):
        rel = path.relative_to(LIB.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if "monailabel_site" in parts:  # a sitecustomize for another interpreter, not part of the library
            continue
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path, module: str) -> list[tuple[str, bool]]:
    """``(imported module of ours, at module level?)`` for every import statement of the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    top_level = {id(n) for n in tree.body} | {id(n) for stmt in tree.body if isinstance(stmt, ast.If)
                                               for n in ast.walk(stmt)}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            if name == "meduet" or name.startswith("meduet."):
                while name not in MODULES and "." in name:
                    name = name.rsplit(".", 1)[0]  # "from meduet.x import func" -> meduet.x
                found.append((name, id(node) in top_level))
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "meduet"


GRAPH = {m: {(dep, top) for dep, top in _imports(p, m) if dep != m} for m, p in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_arrows_point_down(module):
    layer = _layer(module)
    bad = []
    for dep, _ in sorted(GRAPH[module]):
        other = _layer(dep)
        if other == layer or dep == "meduet":
            continue
        if layer in BOTTOM_ALLOWED and other not in BOTTOM_ALLOWED[layer]:
            bad.append(dep)
        elif other in FORBIDDEN.get(layer, set()):
            bad.append(dep)
    assert not bad, f"{module} ({layer}) imports {bad}, against the layers in docs/ARCHITECTURE.md"


def test_no_import_hidden_in_a_function():
    hidden = sorted((m, dep) for m, deps in GRAPH.items() for dep, top in deps
                    if not top and (m, dep) not in FUNCTION_LEVEL_ALLOWED)
    assert not hidden, f"imports of ours inside function bodies (move them to the top of the module): {hidden}"


def test_no_import_cycle():
    edges = {m: {d for d, _ in deps if d in MODULES} for m, deps in GRAPH.items()}
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_library_names_no_bundle_folder():
    hits = [f"{p.relative_to(LIB.parent)}:{i}" for p in MODULES.values()
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"(?<![\w/.])bundles/", line)]
    assert not hits, f"the library names a bundles/ path (take it from the config instead): {hits}"


def test_the_rule_finds_what_it_should(tmp_path):
    """The checks themselves on a made-up module: a hidden function-level import and an upward arrow are found."""
    src = "import torch\nfrom meduet.errors import MeduetError\n\ndef f():\n    from meduet.engines import trainer\n"
    path = tmp_path / "fake.py"
    path.write_text(src)
    deps = _imports(path, "meduet.networks.fake")
    assert ("meduet.errors", True) in deps and ("meduet.engines.trainer", False) in deps
