"""Everything outside ``cxr_ray.ray_backend`` imports and runs without Ray; Ray is used through
its public names only.

The import checks run in a fresh interpreter with ``sys.modules["ray"] = None`` set before
anything is imported, so any ``import ray`` (direct or through another module) raises
ImportError there.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import cxr_ray

PACKAGE = Path(cxr_ray.__file__).resolve().parent
RAY_BACKEND = PACKAGE / "ray_backend"

_BLOCK_RAY = 'import sys\nsys.modules["ray"] = None\n'

_IMPORT_ALL = _BLOCK_RAY + '''
import argparse, importlib, json, pkgutil
import cxr_ray

def walk(package):
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if info.name == "cxr_ray.ray_backend":
            continue
        module = importlib.import_module(info.name)
        yield info.name
        if info.ispkg:
            yield from walk(module)

names = list(walk(cxr_ray))
from cxr_ray import cli
parser = cli.build_parser()
print(json.dumps({"modules": names,
                  "commands": sorted(next(a for a in parser._actions
                                         if isinstance(a, argparse._SubParsersAction)).choices),
                  "ray": sorted(k for k, v in sys.modules.items()
                                if (k == "ray" or k.startswith("ray.")) and v is not None)}))
'''

_TRAIN_HELP = '''
from cxr_ray import cli
try:
    cli.main(["train", "--help"])
except SystemExit as exc:
    assert exc.code == 0, exc.code
print("RAY-LOADED" if any(k == "ray" or k.startswith("ray.") for k in sys.modules
                          if sys.modules[k] is not None) else "NO-RAY")
'''


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=PACKAGE.parent)


def _sources(under: Path = PACKAGE) -> list[Path]:
    return sorted(under.rglob("*.py"))


def test_every_module_but_ray_backend_imports_without_ray():
    proc = _python(_IMPORT_ALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = sorted(
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for p in _sources() if RAY_BACKEND not in p.parents
        and not (p.name == "__init__.py" and p.parent == PACKAGE))
    assert sorted(out["modules"]) == expected
    for name in ("cxr_ray.cli", "cxr_ray.train.loop", "cxr_ray.train.run",
                 "cxr_ray.data.prepare", "cxr_ray.sweep.trial"):
        assert name in out["modules"]
    assert {"train", "lr-find", "prepare", "sweep"} <= set(out["commands"])
    assert out["ray"] == []


@pytest.mark.parametrize("block", [True, False], ids=["ray-blocked", "ray-importable"])
def test_train_help_prints_without_importing_ray(block):
    proc = _python((_BLOCK_RAY if block else "import sys\n") + _TRAIN_HELP)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: cxr-ray train" in proc.stdout
    for flag in ("--shards", "--cohort", "--out", "--launcher", "--augment-on"):
        assert flag in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "NO-RAY"


def _is_ray(module: str | None) -> bool:
    return module is not None and (module == "ray" or module.startswith("ray."))


def _ray_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted name) of every ``import ray...`` / ``from ray... import`` and every
    ``importlib.import_module("ray...")`` / ``__import__("ray...")`` call."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if _is_ray(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_ray(node.module):
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and _is_ray(node.args[0].value):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return found


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def test_no_ray_import_outside_ray_backend():
    offenders = [f"{p.relative_to(PACKAGE.parent)}:{line}: {name}"
                 for p in _sources() if RAY_BACKEND not in p.parents
                 for line, name in _ray_imports(ast.parse(p.read_text(), str(p)))]
    assert offenders == []


def test_ray_backend_imports_ray_and_the_check_sees_it():
    # the detector itself: it must find the imports that ray_backend does have
    names = {name for p in _sources(RAY_BACKEND)
             for _, name in _ray_imports(ast.parse(p.read_text(), str(p)))}
    assert "ray" in names
    assert _ray_imports(ast.parse("import ray.data as rd\nfrom ray import tune\n"
                                  "importlib.import_module('ray.train')\n")) == [
        (1, "ray.data"), (2, "ray.tune"), (3, "ray.train")]
    assert _ray_imports(ast.parse('"""import ray"""\nx = "from ray import tune"\n')) == []


def _private_ray_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of every underscore-prefixed Ray name imported or reached by attribute
    (``from ray.train._internal import x``, ``from ray import _raylet``, ``ray._private.y``,
    ``rd._internal`` after ``import ray.data as rd``)."""
    found = [(line, name) for line, name in _ray_imports(tree)
             if any(part.startswith("_") for part in name.split("."))]
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _is_ray(a.name):
                    local = a.asname or a.name.split(".")[0]
                    aliases[local] = a.name if a.asname else local
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_ray(node.module):
            aliases.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            if dotted is None:
                continue
            head, *rest = dotted.split(".")
            if head in aliases and any(part.startswith("_") for part in rest):
                found.append((node.lineno, ".".join([aliases[head], *rest])))
    return sorted(set(found))


def test_private_name_check_sees_private_names():
    code = ("import ray\nimport ray.data as rd\nfrom ray.train._internal import session\n"
            "from ray import _raylet\nray._private.worker.global_worker\nrd._internal.x\n"
            "ray.train.report\nobj._private\n")
    assert _private_ray_uses(ast.parse(code)) == [
        (3, "ray.train._internal.session"), (4, "ray._raylet"), (5, "ray._private"),
        (5, "ray._private.worker"), (5, "ray._private.worker.global_worker"),
        (6, "ray.data._internal"), (6, "ray.data._internal.x")]


def test_no_private_ray_names():
    offenders = []
    for p in _sources():
        text = p.read_text()
        where = p.relative_to(PACKAGE.parent)
        if "ray._private" in text:
            offenders.append(f"{where}: mentions ray._private")
        offenders += [f"{where}:{line}: {name}"
                      for line, name in _private_ray_uses(ast.parse(text, str(p)))]
    assert offenders == []
