"""The dependency rules of docs/architecture.md, checked on the source with `ast`.

Every `import ember.X` / `from ember.X import ...` / relative import / `importlib.import_module("ember.X")`
in ember/**/*.py counts, including imports inside functions (lazy imports are still dependencies).

Rule table (a module in GROUP may import ember modules of the groups listed; its own group included):

    group        members                                        may import
    -----------  ---------------------------------------------  -----------------------------------------
    models       ember/models/                                  models only; third-party: torch + stdlib
    base         ember/config.py errors.py fileio.py log.py     base
    transforms   ember/parallel/ peft/ quant/ compress/         base, models, transforms
    apps         ember/train/ infer/ eval/ data/ tokenizer/     base, models, transforms, apps
                 serve/
    recipes      ember/recipes/                                 base, models, transforms, apps, recipes
    cli          ember/cli.py, ember/__main__.py                everything in ember
    facade       ember/__init__.py                              base, models, transforms, apps

    Nothing in ember imports `bench` or `tests`; only cli (and recipes) import recipes.
    `import ember` / `from ember import __version__` counts as base (the package __init__ is tiny).
    Within apps: infer/ and serve/ never import train/ (inference runs without the training package).
    ember/_version.py imports nothing. No file-level import cycle anywhere in ember/ (lazy imports count).

A new top-level module or package under ember/ must be added to GROUPS (the test says so).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "ember"

GROUPS = {
    "models": {"models"},
    "base": {"config", "errors", "fileio", "log", "_version"},
    "transforms": {"parallel", "peft", "quant", "compress"},
    "apps": {"train", "infer", "eval", "data", "tokenizer", "serve", "io"},
    "recipes": {"recipes"},
    "cli": {"cli", "__main__"},
    "facade": {"__init__"},
}
ALLOWED = {
    "models": {"models"},
    "base": {"base"},
    "transforms": {"base", "models", "transforms"},
    "apps": {"base", "models", "transforms", "apps"},
    "recipes": {"base", "models", "transforms", "apps", "recipes"},
    "cli": set(GROUPS),
    "facade": {"base", "models", "transforms", "apps"},
}
NON_CODE = {"assets"}  # package data directories
MODELS_THIRD_PARTY = {"torch", "__future__"}
FORBIDDEN_TOP = {"bench", "tests", "conftest"}


def group_of(top: str) -> str | None:
    """The group of ember's top-level module or package `top` ("models", "config", "__init__", ...)."""
    return next((g for g, members in GROUPS.items() if top in members), None)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve_from(node: ast.ImportFrom, path: Path) -> str:
    """The absolute module of a `from X import ...`, relative imports resolved against `path`."""
    if node.level == 0:
        return node.module or ""
    pkg = module_name(path).split(".")
    if path.name != "__init__.py":
        pkg = pkg[:-1]
    base = pkg[: len(pkg) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_module(dotted: str) -> bool:
    p = ROOT.joinpath(*dotted.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def imports_of(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, dotted module) for every import in a file, lazy ones and import_module("...") included."""
    tree = ast.parse(source if source is not None else path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve_from(node, path)
            for a in node.names:  # `from ember import log` imports the module ember.log
                sub = f"{mod}.{a.name}"
                out.append((node.lineno, sub if mod.startswith("ember") and _is_module(sub) else mod))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value))
    return out


def target_group(dotted: str) -> str:
    """Group of an imported ember module: ember.models.layers -> models.

    `ember` itself (e.g. `from ember import __version__`) counts as base: Python imports the package
    before any ember.X anyway, and ember/__init__.py only holds the version and lazy functions.
    """
    parts = dotted.split(".")
    return "base" if len(parts) == 1 else (group_of(parts[1]) or f"<unlisted ember.{parts[1]}>")


def violations(path: Path, source: str | None = None) -> list[str]:
    rel = path.relative_to(PKG)
    top = rel.parts[0].removesuffix(".py")
    group = group_of(top)
    if group is None:
        return [f"{path.relative_to(ROOT)}: ember/{rel.parts[0]} is not in the rule table of "
                "tests/test_architecture.py; add it to the group docs/architecture.md puts it in"]
    bad = []
    for line, mod in imports_of(path, source):
        where = f"{path.relative_to(ROOT)}:{line}: {group} imports {mod}"
        head = mod.split(".")[0]
        if head in FORBIDDEN_TOP:
            bad.append(f"{where} (nothing in ember imports bench or tests)")
        elif head == "ember":
            tg = target_group(mod)
            if tg not in ALLOWED[group]:
                bad.append(f"{where} ({tg} is above {group}; allowed: {sorted(ALLOWED[group])})")
        elif group == "models" and head not in MODELS_THIRD_PARTY and head not in sys.stdlib_module_names:
            bad.append(f"{where} (models imports torch and the standard library only)")
        if head == "ember" and rel.parts[0] in ("infer", "serve") and mod.split(".")[1:2] == ["train"]:
            bad.append(f"{where} ({rel.parts[0]} never imports train: inference runs without the training package)")
        if rel.as_posix() == "_version.py" and mod != "__future__":
            bad.append(f"{where} (ember/_version.py imports nothing)")
    return bad


def import_graph(sources: dict[Path, str] | None = None) -> dict[str, set[str]]:
    """module -> the ember modules it imports (anywhere in the file), over every file of ember/."""
    files = {f: None for f in ember_files()} if sources is None else sources
    graph: dict[str, set[str]] = {}
    for path, source in files.items():
        name = module_name(path)
        deps = set()
        for _, mod in imports_of(path, source):
            if mod.split(".")[0] != "ember":
                continue
            while mod and not _is_module(mod) and mod not in {module_name(p) for p in files}:
                mod = mod.rpartition(".")[0]  # `from ember.x import Name`: the module is ember.x
            if mod and mod != name and mod != "ember":
                deps.add(mod)
        graph[name] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), as sorted lists."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def ember_files() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if not set(p.relative_to(PKG).parts) & NON_CODE)


# ---------------------------------------------------------------------------------------- the check
def test_dependency_direction():
    files = ember_files()
    assert len(files) > 10
    bad = [v for f in files for v in violations(f)]
    assert not bad, "dependency direction broken (see docs/architecture.md):\n" + "\n".join(bad)


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "file-level import cycles (lazy imports count):\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_planted_cycle():
    a, b, c = PKG / "train" / "a.py", PKG / "train" / "b.py", PKG / "train" / "c.py"
    graph = import_graph({a: "from ember.train.b import x\n", b: "def f():\n    from ember.train.c import y\n",
                          c: "import ember.train.a\n"})
    assert find_cycles(graph) == [["ember.train.a", "ember.train.b", "ember.train.c"]]


def test_rule_table_covers_every_top_level_entry():
    tops = {p.name.removesuffix(".py") for p in PKG.iterdir()
            if (p.suffix == ".py" or (p / "__init__.py").is_file())}
    unlisted = sorted(t for t in tops if group_of(t) is None)
    assert not unlisted, f"add {unlisted} to GROUPS in tests/test_architecture.py"


# -------------------------------------------------------------------------- the checker catches breaks
@pytest.mark.parametrize("file,source,needle", [
    ("models/x.py", "import numpy\n", "torch and the standard library"),
    ("models/x.py", "def f():\n    from ember.log import log\n", "base is above models"),
    ("models/x.py", "from ember import errors\n", "base is above models"),
    ("models/x.py", "from ember import __version__\n", "base is above models"),
    ("models/x.py", "from ..train import loop\n", "apps is above models"),
    ("config.py", "import ember.models\n", "models is above base"),
    ("parallel/x.py", "from ember.train.loop import train\n", "apps is above transforms"),
    ("train/x.py", "import importlib\nimportlib.import_module('ember.recipes.pretrain')\n", "recipes is above apps"),
    ("data/x.py", "from ember.cli import main\n", "cli is above apps"),
    ("infer/x.py", "import bench.common\n", "bench or tests"),
    ("recipes/x.py", "from tests.test_cli import run\n", "bench or tests"),
    ("recipes/x.py", "from ember import cli\n", "cli is above recipes"),
    ("infer/x.py", "def f():\n    from ember.train.loop import Trainer\n", "infer never imports train"),
    ("serve/x.py", "from ember.train import loss\n", "serve never imports train"),
    ("_version.py", "import os\n", "imports nothing"),
])
def test_checker_flags_violations(file, source, needle):
    bad = violations(PKG / file, source)
    assert any(needle in b for b in bad), bad


@pytest.mark.parametrize("file,source", [
    ("models/x.py", "from __future__ import annotations\nimport math\nimport torch.nn.functional as F\n"
                    "from ember.models.config import ModelConfig\nfrom .layers import Block\n"),
    ("parallel/x.py", "from ember.models import Transformer\nfrom ember.log import log\n"),
    ("train/x.py", "from ember.data.loader import TokenLoader\nfrom ember.parallel import dims\nimport numpy\n"
                   "from ember import __version__\n"),
    ("recipes/x.py", "from ember.recipes import pretrain\nfrom ember.train import loop\n"),
    ("cli.py", "import importlib\nimportlib.import_module('ember.recipes.pretrain')\n"),
])
def test_checker_allows_the_right_direction(file, source):
    assert violations(PKG / file, source) == []
