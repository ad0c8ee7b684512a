"""The package's folders are its layers (DESIGN §2): no module imports from a layer above its own.

Every import is read from the source (absolute and relative, at module level
or inside functions); an import of a module above the importer's layer fails
the test with the file, the line and the import.
"""

from __future__ import annotations

import ast
import os

import pytest

from tests import REPO_ROOT

PACKAGE = "cofi_kernels"
PACKAGE_DIR = os.path.join(REPO_ROOT, PACKAGE)

# Longest prefix wins. The compiled extension sits below everything.
LAYERS = {
    f"{PACKAGE}._C": 0,
    f"{PACKAGE}.ops": 1,
    f"{PACKAGE}.functional": 2,
    f"{PACKAGE}.modules": 3,
    f"{PACKAGE}.models": 4,
    f"{PACKAGE}.data": 5,
    f"{PACKAGE}.tasks": 5,
    f"{PACKAGE}.training": 6,
    f"{PACKAGE}.serving": 6,
    f"{PACKAGE}.pruning": 7,
    f"{PACKAGE}.cli": 8,
    f"{PACKAGE}.info": 8,
    f"{PACKAGE}.__main__": 8,
    PACKAGE: 8,  # the package __init__ with its lazy top-level names
}
LAYER_NAMES = {0: "extension", 1: "ops", 2: "functional", 3: "modules", 4: "models", 5: "data/tasks",
               6: "training/serving", 7: "pruning", 8: "top (cli, info, __init__)"}


def layer_of(module: str) -> int | None:
    """The layer of a ``cofi_kernels`` module name, or None for one outside every layer."""
    best = None
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return None if best is None else best[1]


def module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO_ROOT)[: -len(".py")].replace(os.sep, ".")
    return rel.removesuffix(".__init__")


def _is_module(name: str) -> bool:
    base = os.path.join(REPO_ROOT, *name.split("."))
    return os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__init__.py")) or name == f"{PACKAGE}._C"


def imports_of(source: str, module: str, is_package: bool) -> list[tuple[int, str, str]]:
    """``(line, imported module, import text)`` for every import of a ``cofi_kernels`` module in ``source``."""
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    found.append((node.lineno, alias.name, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            text = f"from {'.' * node.level}{node.module or ''} import {', '.join(a.name for a in node.names)}"
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if _is_module(sub) else target, text))
    return found


def upward_imports(path: str) -> list[str]:
    """Messages for every import in ``path`` of a module above its own layer."""
    module = module_name(path)
    own = layer_of(module)
    if own is None:
        return [f"{os.path.relpath(path, REPO_ROOT)}: module {module} is in no layer; add its folder to DESIGN §2"]
    with open(path, encoding="utf-8") as f:
        source = f.read()
    problems = []
    for line, target, text in imports_of(source, module, path.endswith("__init__.py")):
        theirs = layer_of(target)
        if theirs is None:
            problems.append(f"{os.path.relpath(path, REPO_ROOT)}:{line}: `{text}` imports {target}, which is in no layer")
        elif theirs > own:
            problems.append(
                f"{os.path.relpath(path, REPO_ROOT)}:{line}: `{text}` imports {target} "
                f"(layer {theirs}, {LAYER_NAMES[theirs]}) from layer {own} ({LAYER_NAMES[own]})"
            )
    return problems


def package_files() -> list[str]:
    out = []
    for root, dirs, names in os.walk(PACKAGE_DIR):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        out += [os.path.join(root, n) for n in names if n.endswith(".py")]
    return sorted(out)


def test_no_module_imports_from_a_layer_above():
    files = package_files()
    assert len(files) > 20, files
    problems = [p for f in files for p in upward_imports(f)]
    assert not problems, "upward imports:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "rel_path, source, bad",
    [
        ("ops/gelu_gate.py", "from ..models import pruned_model\n", "cofi_kernels.models.pruned_model"),
        ("modules/x.py", "def f():\n    from ..pruning.cofi.gates import CoFiGates\n", "cofi_kernels.pruning.cofi.gates"),
        ("training/trainer.py", "import cofi_kernels.pruning.cofi.loop\n", "cofi_kernels.pruning.cofi.loop"),
        ("models/size.py", "from cofi_kernels import cli\n", "cofi_kernels.cli"),
        ("functional.py", "from . import info\n", "cofi_kernels.info"),
        ("ops/backends.py", "from .. import apply_cofi\n", "cofi_kernels"),
    ],
)
def test_checker_catches_an_upward_import(tmp_path, monkeypatch, rel_path, source, bad):
    """The checker itself: each of these planted imports must be reported, with its file and target."""
    path = os.path.join(PACKAGE_DIR, rel_path)
    monkeypatch.setattr("builtins.open", _open_with(path, source))
    problems = upward_imports(path)
    assert len(problems) == 1 and bad in problems[0] and rel_path in problems[0], problems


def test_checker_accepts_downward_and_sibling_imports(monkeypatch):
    path = os.path.join(PACKAGE_DIR, "pruning", "cofi", "loop.py")
    source = ("from ...training.trainer import RunError\nfrom .gates import CoFiGates\n"
              "from ...ops import reference\nimport torch\n")
    monkeypatch.setattr("builtins.open", _open_with(path, source))
    assert upward_imports(path) == []


def _open_with(path: str, source: str):
    import builtins
    import io

    real_open = builtins.open

    def fake_open(p, *args, **kwargs):
        if os.fspath(p) == path:
            return io.StringIO(source)
        return real_open(p, *args, **kwargs)

    return fake_open
