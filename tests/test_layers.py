"""Imports run down the layers, and a module's interface is what it names without an underscore.

The layers contract lives in setup.cfg (``[importlinter:contract:layers]``): cli > explore > runs > featvis >
training | analysis > render > mirror | mining > graph > io | utils | config > errors. import-linter
reads every import statement, function-local ones included.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List

import pytest

import importlinter  # noqa: F401  (a test dependency: fail, never skip, when it is missing)

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "deconvis"
#: attributes with a leading underscore that belong to other libraries' public API
FOREIGN_UNDERSCORE = {"_replace", "_asdict", "_fields", "_make", "_subclasses", "_C", "_dynamo", "_getframe",
                      "_version"}  # (torch.Tensor._version: the version counter in-place ops bump)


def _lint(config: Path, path: Path) -> int:
    """Run import-linter on the package under ``path`` in a child process (it sets up logging of
    its own, which would silence the run logs that later tests read); prints its report."""
    code = (
        "import sys; from importlinter.cli import lint_imports; "
        f"sys.exit(lint_imports(config_filename={str(config)!r}, no_cache=True, no_logo=True))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=str(path), env=env, capture_output=True, text=True)
    print(proc.stdout, proc.stderr)
    return proc.returncode


def test_imports_run_down_the_layers():
    assert _lint(ROOT / "setup.cfg", ROOT) == 0, "an import runs up a layer: see the contract report above"


def test_the_contract_sees_a_function_local_upward_import(tmp_path):
    pkg = tmp_path / "layered"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "high.py").write_text("from layered import low\n")
    (pkg / "low.py").write_text("def f():\n    from layered import high  # upward, inside a function\n")
    cfg = tmp_path / "setup.cfg"
    cfg.write_text(textwrap.dedent("""\
        [importlinter]
        root_package = layered

        [importlinter:contract:layers]
        name = layered
        type = layers
        layers =
            layered.high
            layered.low
        """))
    assert _lint(cfg, tmp_path) == 1


def _modules() -> List[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(path: Path, here: str = "") -> List[str]:
    """``from deconvis.X import _name`` (absolute or relative) in module ``path`` (named ``here``),
    X not the module itself."""
    here = here or _module_name(path)
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.ImportFrom):
            continue
        mod = node.module or ""
        if node.level:
            base = here.split(".") if path.name == "__init__.py" else here.split(".")[:-1]
            mod = ".".join(base[:len(base) - node.level + 1] + ([mod] if mod else []))
        if not mod.startswith("deconvis") or mod == here:
            continue
        out += [f"{path}:{node.lineno}: from {mod} import {a.name}"
                for a in node.names if _private(a.name)]
    return out


def private_reaches(path: Path) -> List[str]:
    """``obj._name`` where ``obj`` is not ``self``/``cls`` nor an imported third-party module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    foreign = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            foreign |= {(a.asname or a.name).split(".")[0] for a in node.names if not a.name.startswith("deconvis")}
        elif isinstance(node, ast.ImportFrom) and not node.level and not (node.module or "").startswith("deconvis"):
            foreign |= {a.asname or a.name for a in node.names}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in FOREIGN_UNDERSCORE:
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            if isinstance(root, ast.Name) and root.id in foreign:
                continue
            out.append(f"{path}:{node.lineno}: .{node.attr}")
    return out


def test_no_module_imports_another_modules_underscore_names():
    found = [line for p in _modules() for line in private_imports(p)]
    assert not found, "make the name public with a docstring, or keep it inside its module:\n" + "\n".join(found)


def test_no_module_reaches_into_another_objects_private_fields():
    found = [line for p in _modules() for line in private_reaches(p)]
    assert not found, "give the field a public name with a docstring:\n" + "\n".join(found)


def test_the_checks_catch_what_they_name(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\nfrom torch import nn\nfrom deconvis.mirror.engine import Mirror as _M\nfrom deconvis.graph.ops import _hidden\n"
                     "from .rf import _walk\n"
                     "def f(m):\n    return m.mirror._secret, other._x, self._mine, torch._C, m._replace, nn.modules.conv._ConvNd\n")
    found = private_imports(probe, here="deconvis.graph.probe")
    assert [s.rsplit(" ", 1)[-1] for s in found] == ["_hidden", "_walk"]
    assert [s.rsplit(".", 1)[-1] for s in private_reaches(probe)] == ["_secret", "_x"]
