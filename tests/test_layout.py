"""The package's shape: every module imports on its own, and no module imports itself back.

Each module is imported in a fresh interpreter (a cycle or an import-time side effect that a
warm ``sys.modules`` would hide shows up there), and the module-level imports of the whole
package are read from the source to find cycles, function-level imports included.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"mofa_omni": ROOT / "runtime", "mofa_omni_nodes": ROOT / "nodes"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = modules()


def test_every_module_imports_on_its_own():
    # One interpreter per module would take minutes (MLX, transformers): one per module is not
    # needed to catch cycles -- a fresh interpreter importing them one after another, each
    # after dropping every mofa_omni module from sys.modules, imports each from scratch.
    script = (
        "import importlib, sys, traceback\n"
        "failed = []\n"
        f"for name in {sorted(MODULES)!r}:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('mofa_omni')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed.append(name + ': ' + traceback.format_exc(limit=3))\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, env={"MOFA_OMNI_NO_OPENBLAS": "1", "PATH": ""})
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]


def imports_of(name: str, path: Path) -> set[str]:
    """The project modules ``name`` imports, wherever in the file the import statement is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    for block in ast.walk(tree):  # imports for type checkers only are never run
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test):
            block.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        found.update(target for target in targets if target in MODULES and target != name)
    return found


def test_no_import_cycles():
    graph = {name: imports_of(name, path) for name, path in MODULES.items()}
    cycles, done = [], set()

    def visit(path: list[str]) -> None:
        for target in sorted(graph[path[-1]]):
            if target in path:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in done:
                visit(path + [target])
        done.add(path[-1])

    for name in sorted(graph):
        if name not in done:
            visit([name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("module", ["mofa_omni.testing.tiny_vlm", "mofa_omni.testing.pytest_plugin"])
def test_test_helpers_are_not_shipped(module):
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert module.rpartition(".")[0] not in packages
    shipped = {name.rpartition(".")[0] if not MODULES[name].name == "__init__.py" else name
               for name in MODULES}
    assert shipped - {"mofa_omni.testing"} <= set(packages), "a sub-package is missing from the wheel"
