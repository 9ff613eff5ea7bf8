"""Loading a user's workflow file by path, without running its ``__main__`` block."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from reflow_client import codec

if TYPE_CHECKING:
    from .workflow import Workflow


class WorkflowLoadError(RuntimeError):
    """The workflow file could not be loaded or does not define the workflow."""


def load_module(path: str | Path) -> ModuleType:
    """Import *path* as a module named after its location; sibling imports keep working."""
    file = Path(path).resolve()
    if not file.is_file():
        raise WorkflowLoadError(f"workflow file {file} does not exist")
    name = "reflow_workflow_" + hashlib.sha1(str(file).encode()).hexdigest()[:10]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise WorkflowLoadError(f"cannot load {file} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    if str(file.parent) not in sys.path:
        sys.path.insert(0, str(file.parent))
    codec.set_workflow_module(name)
    try:
        spec.loader.exec_module(module)
    except SystemExit as exc:
        sys.modules.pop(name, None)
        raise WorkflowLoadError(
            f"{file} exited (sys.exit({exc.code!r})) while being imported; call wf.cli() only under "
            "'if __name__ == \"__main__\":'"
        ) from None
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def find_workflow(module: ModuleType, name: str | None = None) -> Workflow:
    """The module-level Workflow called *name* (or the only one)."""
    from .workflow import Workflow

    found = [v for v in vars(module).values() if isinstance(v, Workflow)]
    if name is not None:
        found = [w for w in found if w.name == name]
    unique = list({id(w): w for w in found}.values())
    where = getattr(module, "__file__", module.__name__)
    if not unique:
        what = f"Workflow named {name!r}" if name else "Workflow"
        raise WorkflowLoadError(
            f"{where} defines no module-level {what} when imported (is it created inside a function or only under "
            "'if __name__ == \"__main__\":'?); create it at the top level of the file"
        )
    if len(unique) > 1:
        names = ", ".join(sorted(w.name for w in unique))
        raise WorkflowLoadError(f"{where} defines several workflows ({names}); name the one to use")
    return unique[0]


def load_workflow(path: str | Path, name: str | None = None) -> Workflow:
    wf = find_workflow(load_module(path), name)
    wf.entrypoint = Path(path).resolve()
    return wf


def _is_main_guard(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":`` (either operand order)."""
    if not isinstance(node, ast.If) or not isinstance(node.test, ast.Compare) or len(node.test.comparators) != 1:
        return False
    sides = [node.test.left, node.test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    texts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return bool(names and texts)


def _bound_names(node: ast.stmt) -> set[str]:
    targets: list[ast.expr] = []
    if isinstance(node, ast.Assign):
        targets = list(node.targets)
    elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and node.value is not None:
        targets = [node.target]
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    names: set[str] = set()
    for target in targets:
        names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def assigned_at_import(path: str | Path, names: set[str]) -> bool | None:
    """Does importing *path* bind one of *names* at module level? None when the file cannot be read.

    Statements under ``if __name__ == "__main__":`` do not run on import; other
    compound statements at the top level (if, try, with, for) do.
    """
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if _is_main_guard(node):
            continue
        if _bound_names(node) & names:
            return True
        if isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
            for block in ("body", "orelse", "finalbody"):
                pending.extend(getattr(node, block, []))
            for handler in getattr(node, "handlers", []):
                pending.extend(handler.body)
    return False
