"""The layering the README's Architecture section describes, enforced: a module may import only from its own part
and the parts below it, so the arrows never turn upwards (issue 16)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "twotower_cli"
CORE = {"errors", "config", "config_checks", "config_template", "compat", "runs", "__init__", "__main__"}
# what each part may import (besides itself and the core modules); the order is the README's, bottom up
ALLOWED = {
    "data": set(),
    "model": {"data"},
    "retrieval": {"data", "model"},
    "evaluation": {"data", "model", "retrieval"},
    "tracking": set(),
    "training": {"data", "model", "retrieval", "evaluation", "tracking"},
    "api": {"data", "model", "retrieval"},
    "serve": {"api"},
    "cli": {"data", "model", "retrieval", "evaluation", "tracking", "training", "api", "serve"},
    "core": set(),
}


ENTRY_POINTS = {"twotower_cli", "twotower_cli.__main__"}  # the package's lazy re-export of the API; `python -m`


def part_of(module: str) -> str:
    """twotower_cli.model.towers -> model; twotower_cli.runs -> core."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__version__":
        return "core"
    head = parts[1]
    return "core" if head in CORE else head


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):  # inside functions too: a lazy import is still an arrow
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            if node.module == "twotower_cli":
                out += [f"twotower_cli.{a.name}" for a in node.names]
    return out


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        yield ".".join(rel.parts).removesuffix(".__init__"), path


def test_the_arrows_point_down():
    wrong = []
    for name, path in modules():
        mine = part_of(name)
        if name in ENTRY_POINTS:
            continue
        for imported in imports(path):
            if not imported.startswith("twotower_cli") or imported == "twotower_cli":
                continue
            theirs = part_of(imported)
            if theirs not in ("core", mine) and theirs not in ALLOWED[mine]:
                wrong.append(f"{name} ({mine}) imports {imported} ({theirs})")
    assert not wrong, "\n".join(wrong)


def test_only_the_cli_touches_the_terminal():
    wrong = [f"{name} imports {m}" for name, path in modules() if part_of(name) != "cli"
             for m in imports(path) if m.split(".")[0] in ("typer", "rich", "click")]
    assert not wrong, "\n".join(wrong)
    wrong = [f"{name} imports click" for name, path in modules() for m in imports(path) if m.split(".")[0] == "click"]
    assert not wrong  # Typer-native: no `import click` anywhere


def test_data_never_imports_torch_nn_and_model_never_imports_tracking():
    for name, path in modules():
        found = imports(path)
        if part_of(name) == "data":
            assert not [m for m in found if m.startswith("torch.nn")], name
        if part_of(name) == "model":
            assert not [m for m in found if m.startswith("twotower_cli.tracking")], name


def test_the_query_path_imports_no_torch():
    """What a search needs (the API, the NumPy towers, indexes, BM25, top-k) has no torch import at module level."""
    for module in ("api", "model/numpy_encoder", "model/files", "model/config", "retrieval/index",
                   "retrieval/bm25", "retrieval/fusion", "retrieval/search", "retrieval/snapshot",
                   "retrieval/topk_numpy", "model/run_encoder", "data/vocab", "runs"):
        tree = ast.parse((PACKAGE / f"{module}.py").read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in top if isinstance(n, ast.ImportFrom) and n.module]
        assert not [m for m in names if m.split(".")[0] in ("torch", "polars")], module


def test_readme_guarantees_name_real_tests():
    import re

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Guarantees"):text.index("## Architecture")]
    named = set(re.findall(r"\b(test_\w+)(?!\.py)\b", section)) - {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(), re.M))
    assert len(named) >= 30 and not (named - defined), sorted(named - defined)
