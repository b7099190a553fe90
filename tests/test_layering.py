"""The library stands on its own: no module of gpt2jax/ imports train/ or eval/, at the top
or inside a function (docs/design.md, "Which way imports run")."""

from __future__ import annotations

import ast
from pathlib import Path

import gpt2jax

LIBRARY = Path(gpt2jax.__file__).parent
OUTSIDE = ("train", "eval", "tests")


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement in the file, nested ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_the_walk_sees_nested_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from train.data import x\n    import eval.common\n")
    assert _imports(probe) == [(2, "train.data"), (3, "eval.common")]


def test_gpt2jax_never_imports_train_eval_or_tests():
    offending = [
        f"{path.relative_to(LIBRARY.parent)}:{line} imports {module}"
        for path in sorted(LIBRARY.rglob("*.py"))
        for line, module in _imports(path)
        if module.split(".")[0] in OUTSIDE
    ]
    assert len(list(LIBRARY.rglob("*.py"))) > 10  # the walk found the library
    assert offending == []
