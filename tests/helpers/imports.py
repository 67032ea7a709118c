"""What importing a module pulls in: measured in a fresh interpreter, or read from the source."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

_IMPORT_EACH = """
import importlib, json, sys
added = {}
for name in sys.argv[1:]:
    before = set(sys.modules)
    importlib.import_module(name)
    added[name] = sorted(set(sys.modules) - before)
print(json.dumps(added))
"""


def fresh_imports(*modules: str) -> dict[str, list[str]]:
    """Import `modules` in this order in a fresh interpreter (from the checkout); for each, the
    names its import added to `sys.modules` (what an earlier one already loaded is not repeated).
    """
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, *modules],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def static_imports(module: str, follow: str = "server") -> dict[str, set[str]]:
    """Every module named by an import statement anywhere in `module`'s source, function bodies
    and `TYPE_CHECKING` blocks included, and likewise for each module under `follow` that it
    names, transitively: `{importing module: names}`.

    `from a import b` counts as importing `a` and `a.b` (b may be a submodule).
    """
    found: dict[str, set[str]] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:  # `a.b` where b is a name in module a, not a submodule
            continue
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        names: set[str] = set()
        for node in ast.walk(ast.parse(Path(spec.origin).read_text(), spec.origin)):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"relative import in {name}"
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        found[name] = names
        todo += [n for n in names if n == follow or n.startswith(follow + ".")]
    return found
