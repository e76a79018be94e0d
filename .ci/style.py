"""The package's style, checked in CI before the tests (a style check, not a test of behaviour): modules that a
reader takes in whole, module names that do not collide, `fit` on one screen, lines of at most 120 columns."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "twotower_cli"
MAX_MODULE_LINES = 360
MAX_FIT_LINES = 40
MAX_LINE = 120


def problems() -> list[str]:
    out = []
    folders: dict[Path, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        rel = path.relative_to(ROOT)
        if len(lines) > MAX_MODULE_LINES:
            out.append(f"{rel}: {len(lines)} lines (at most {MAX_MODULE_LINES}: split it where a reader would)")
        out += [f"{rel}:{i}: {len(line)} columns (at most {MAX_LINE})" for i, line in enumerate(lines, 1)
                if len(line) > MAX_LINE]
        folders.setdefault(path.parent, []).append(path.stem)
    for folder, stems in folders.items():  # no two modules of a part whose names differ by a suffix (train/trainrun)
        for a in stems:
            clash = [b for b in stems if b != a and b.startswith(a) and a not in ("config", "topk", "__init__")]
            if clash:
                out.append(f"{folder.relative_to(ROOT)}: module names {a} and {', '.join(clash)} differ by a suffix")
    tree = ast.parse((PACKAGE / "training" / "loop.py").read_text())
    fit = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "fit")
    if fit.end_lineno - fit.lineno + 1 > MAX_FIT_LINES:
        out.append(f"training/loop.py: fit is {fit.end_lineno - fit.lineno + 1} lines (at most {MAX_FIT_LINES})")
    return out


if __name__ == "__main__":
    found = problems()
    print("\n".join(found) or "style: ok")
    sys.exit(1 if found else 0)
