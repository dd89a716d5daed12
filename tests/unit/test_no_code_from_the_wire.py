"""A scan of the package: nothing on the wire or in the log can become code.

No pickle (or its relatives) anywhere, no eval/exec, and modules are
imported in one place only: where a worker loads the modules its own command
line named. A message can name a task; it can never make a worker import
or evaluate anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[2] / "src" / "taskring"
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal"}
MODULE_LOADER = PACKAGE / "workers" / "loading.py"


def sources() -> list[tuple[Path, ast.AST]]:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20, "the scan found too few files to mean anything"
    return [(path, ast.parse(path.read_text(), str(path))) for path in files]


def test_no_module_imports_pickle_or_its_relatives():
    offenders = []
    for path, tree in sources():
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path}:{node.lineno} {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES
            ]
    assert offenders == []


def test_no_eval_or_exec_and_imports_only_where_the_command_line_names_modules():
    offenders = []
    for path, tree in sources():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            if name in {"eval", "exec", "compile"}:
                offenders.append(f"{path}:{node.lineno} {name}")
            if name in {"import_module", "__import__"} and path != MODULE_LOADER:
                offenders.append(f"{path}:{node.lineno} {name}")
    assert offenders == []
