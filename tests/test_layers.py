"""The house rules of docs/architecture.md, read from the code: layers import only downwards, no import cycle, only the
Python API reaches the recipes from ``mdmf_cache``, and a recipe uses another recipe through its ``run`` alone.

Every import counts, at module level or inside a function (``ast`` walk of every file of ``mdmf_cache/``,
``pipelines/`` and ``cli.py``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

#: The layers, bottom first; a module belongs to the layer of the longest prefix listed.
LAYERS: dict[str, tuple[str, ...]] = {
    "ground": ("mdmf_cache.errors", "mdmf_cache.process", "mdmf_cache.choices", "mdmf_cache.fileio",
               "mdmf_cache.progress", "mdmf_cache.distributed", "mdmf_cache.paper", "mdmf_cache.device",
               "mdmf_cache.tokens", "mdmf_cache.data", "mdmf_cache.layers"),
    "model": ("mdmf_cache.configs", "mdmf_cache.heads", "mdmf_cache.clip", "mdmf_cache.store",
              "mdmf_cache.evaluation"),
    "engines": ("mdmf_cache.extraction", "mdmf_cache.training", "mdmf_cache.sweeps", "mdmf_cache.prediction",
                "mdmf_cache.report"),
    "base recipes": ("pipelines", "pipelines.extract", "pipelines.train", "pipelines.evaluate", "pipelines.predict",
                     "pipelines.runs"),
    "experiment recipes": ("pipelines.sweep", "pipelines.compare", "pipelines.ablate", "pipelines.demo"),
    "faces": ("cli", "mdmf_cache.api", "mdmf_cache"),
}
RANK = {layer: i for i, layer in enumerate(LAYERS)}


def _modules() -> dict[str, Path]:
    files = [*REPO.glob("mdmf_cache/**/*.py"), *REPO.glob("pipelines/*.py"), REPO / "cli.py"]
    out = {}
    for p in files:
        parts = list(p.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def layer_of(module: str) -> str:
    best = max(((prefix, layer) for layer, prefixes in LAYERS.items() for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), key=lambda x: len(x[0]), default=None)
    if best is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add its package to LAYERS and to "
                             "docs/architecture.md")
    return best[1]


def _imports(module: str) -> list[tuple[str, int, str, list[str]]]:
    """(imported module, line, how, names) of every project import of ``module``; relative imports are refused."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                out.append(("<relative>", node.lineno, "relative", []))
                continue
            mod = node.module or ""
            if mod.split(".")[0] not in ("mdmf_cache", "pipelines", "cli"):
                continue
            for a in node.names:  # from PKG import SUBMODULE imports the submodule
                sub = f"{mod}.{a.name}"
                out.append((sub if sub in MODULES else mod, node.lineno, "from", [a.name]))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in ("mdmf_cache", "pipelines", "cli"):
                    out.append((a.name, node.lineno, "import", []))
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_is_in_a_layer_and_imports_are_absolute() -> None:
    for module in MODULES:
        layer_of(module)
    relative = [f"{m}:{line}" for m, imps in GRAPH.items() for target, line, how, _ in imps if how == "relative"]
    assert not relative, f"relative imports (write them absolute): {relative}"
    unknown = [f"{m}:{line} {t}" for m, imps in GRAPH.items() for t, line, _, _ in imps if t not in MODULES]
    assert not unknown, f"imports of modules that do not exist: {unknown}"


def test_no_import_runs_up_the_layers() -> None:
    upward = [f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)}) at line {line}"
              for m, imps in GRAPH.items() for t, line, _, _ in imps
              if t in MODULES and t != m and RANK[layer_of(t)] > RANK[layer_of(m)]]
    assert not upward, "\n".join(upward)


def test_only_the_api_reaches_the_recipes_from_the_package() -> None:
    bad = [f"{m} imports {t} at line {line}" for m, imps in GRAPH.items() for t, line, _, _ in imps
           if m.startswith("mdmf_cache") and m not in ("mdmf_cache.api",) and t.startswith("pipelines")]
    assert not bad, "\n".join(bad)


def _run_only(module: str) -> list[str]:
    """Uses of another recipe other than its ``run``: ``from pipelines.X import NAME`` with NAME != run, or
    ``from pipelines import X`` followed by ``X.NAME`` with NAME != run."""
    tree = ast.parse(MODULES[module].read_text())
    bad, aliases = [], {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipelines"):
            for a in node.names:
                if node.module == "pipelines":
                    aliases[a.asname or a.name] = a.name
                elif a.name != "run":
                    bad.append(f"{module}:{node.lineno} imports {node.module}.{a.name}")
        elif isinstance(node, ast.Import):
            bad += [f"{module}:{node.lineno} imports {a.name} whole" for a in node.names if a.name.startswith("pipelines")]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                and node.attr != "run":
            bad.append(f"{module}:{node.lineno} uses pipelines.{aliases[node.value.id]}.{node.attr}")
    return bad


def test_a_recipe_uses_another_recipe_through_its_run_alone() -> None:
    bad = [b for m in MODULES if m.startswith("pipelines.") for b in _run_only(m)]
    assert not bad, "\n".join(bad)


def test_no_import_cycle() -> None:
    edges = {m: sorted({t for t, *_ in imps if t in MODULES and t != m}) for m, imps in GRAPH.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in edges[m]:
            if state.get(t) == 1:
                cycle = path[path.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("case", ["up", "cycle", "recipe-helper"])
def test_the_rules_catch_what_they_forbid(case: str, monkeypatch) -> None:
    """Each rule fails on a made-up breach (so none of them passes by reading nothing)."""
    graph = {m: list(v) for m, v in GRAPH.items()}
    if case == "up":
        graph["mdmf_cache.device"] = graph["mdmf_cache.device"] + [("mdmf_cache.store.cache", 1, "from", ["CacheStore"])]
        monkeypatch.setattr(__import__(__name__), "GRAPH", graph)
        with pytest.raises(AssertionError, match="mdmf_cache.device"):
            test_no_import_runs_up_the_layers()
    elif case == "cycle":
        graph["mdmf_cache.errors"] = graph["mdmf_cache.errors"] + [("mdmf_cache.fileio", 1, "from", ["writing"])]
        monkeypatch.setattr(__import__(__name__), "GRAPH", graph)
        with pytest.raises(pytest.fail.Exception, match="import cycle"):
            test_no_import_cycle()
    else:
        tree = "from pipelines import train\n\ntrain._train(None)\n"
        fake = REPO / "pipelines" / "demo.py"
        monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: tree if self == fake else Path.read_bytes(self).decode())
        assert _run_only("pipelines.demo") == ["pipelines.demo:3 uses pipelines.train._train"]
