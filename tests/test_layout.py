"""The layout's one rule, read from the source (ast): imports point down the layers, never up.

    core <- heads, data <- drafters <- bench, train, llamacpp <- xmodal (the research app) <- cli

A module may import from its own layer and the ones below it. So the core never imports the cross-modal app
(or anything built on it), a drafter never imports the benchmark, and only the command line sees everything.
Lazy imports inside functions count too: a back-edge is a back-edge whenever it runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "featspec"

# (layer, module prefixes); the longest matching prefix decides a module's layer
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("featspec", "featspec.errors", "featspec.validate", "featspec.io", "featspec.tree", "featspec.sampling",
              "featspec.verify", "featspec.protocol", "featspec.engine", "featspec.models")),
    ("heads", ("featspec.heads",)),
    ("data", ("featspec.data",)),
    ("drafters", ("featspec.drafters",)),
    ("bench/train", ("featspec.bench", "featspec.train", "featspec.llamacpp")),
    ("app", ("featspec.xmodal",)),
    ("cli", ("featspec.cli", "featspec.xmodal.cli")),
]
RANK = {"core": 0, "heads": 1, "data": 1, "drafters": 2, "bench/train": 3, "app": 4, "cli": 5}


def layer_of(module: str) -> str:
    best, layer = -1, None
    for name, prefixes in LAYERS:
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, layer = len(p), name
    assert layer is not None, f"{module} is in no layer: add it to tests/test_layout.py LAYERS"
    return layer


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every featspec import in the file, top-level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("featspec")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("featspec") and node.level == 0:
            # `from featspec.x import y` may import the module featspec.x.y: judge the deeper name when it is one
            for a in node.names:
                deeper = f"{node.module}.{a.name}"
                is_module = (ROOT.parent / Path(*deeper.split("."))).with_suffix(".py").exists() or \
                    (ROOT.parent / Path(*deeper.split(".")) / "__init__.py").exists()
                found.append((node.lineno, deeper if is_module else node.module))
    return found


SOURCES = sorted(ROOT.rglob("*.py"))


def test_every_module_has_a_layer():
    for path in SOURCES:
        layer_of(module_name(path))


def test_imports_point_down_the_layers():
    bad = []
    for path in SOURCES:
        mod = module_name(path)
        mine = RANK[layer_of(mod)]
        for line, target in imports(path):
            theirs = RANK[layer_of(target)]
            if theirs > mine:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} ({layer_of(mod)}) imports {target} ({layer_of(target)})")
    assert not bad, "imports from a layer above:\n" + "\n".join(bad)


def test_the_core_never_imports_the_app():
    core = [p for p in SOURCES if RANK[layer_of(module_name(p))] < RANK["app"]]
    assert core and not [(p, t) for p in core for _, t in imports(p) if t.startswith("featspec.xmodal")]


@pytest.mark.parametrize("snippet, expected", [
    ("from featspec.xmodal.bench import Kit", "featspec.xmodal.bench"),
    ("import featspec.cli", "featspec.cli"),
])
def test_the_checker_sees_an_upward_import(tmp_path, snippet, expected):
    """The rule can fail: a core file importing the app or the CLI is reported."""
    path = tmp_path / "x.py"
    path.write_text(f"def f():\n    {snippet}\n")
    (line, target), = imports(path)
    assert target == expected and RANK[layer_of(target)] > RANK["core"]
