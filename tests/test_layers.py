"""The layer order (pyproject.toml's import-linter contracts) holds, and an import against it breaks it.

`make lint` runs the contracts too; here each kind of violation is injected into a copy of the
package to show the check sees it (a contract that cannot fail checks nothing).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package under ``root/src`` with ``root/pyproject.toml``'s contracts."""
    script = Path(sys.executable).parent / "lint-imports"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "importlinter.cli"]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    return subprocess.run([*command, "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_layer_contracts_hold():
    run = lint_imports(REPO)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "3 kept, 0 broken" in run.stdout


@pytest.mark.parametrize(("module", "line", "broken"), [
    ("protocol.py", "import vroll.trainer.base", "each layer imports only the layers below it BROKEN"),
    ("engine/config.py", "from vroll.server import app", "each layer imports only the layers below it BROKEN"),
    ("server/app.py", "import vllm", "vLLM is imported only by the engine (and its plugins) BROKEN"),
    ("generation/planning.py", "from vroll.generation import rollouts",
     "no import cycles between the modules and packages of any package BROKEN"),
])
def test_an_import_against_the_order_breaks_the_check(tmp_path, module, line, broken):
    shutil.copytree(REPO / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "src" / "vroll" / module
    target.write_text(target.read_text() + f"\n{line}  # injected\n")
    run = lint_imports(tmp_path)
    assert run.returncode != 0 and broken in run.stdout, run.stdout[-3000:]


MAX_FUNCTION_LINES = 60  # the project's standard (README); a longer function is two


def long_functions(root: Path) -> list[str]:
    """``path:line name (N lines)`` of every function or method under ``root`` over the limit."""
    import ast

    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_no_function_in_src_is_over_60_lines(tmp_path):
    assert long_functions(REPO / "src") == []
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))  # + the def line: one too many
    (tmp_path / "long.py").write_text(f"def too_long():\n{body}\n")
    assert long_functions(tmp_path) == [f"long.py:1 too_long ({MAX_FUNCTION_LINES + 1} lines)"]
