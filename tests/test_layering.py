"""The import contracts of pyproject's [tool.importlinter] (run by `lint-imports` in .ci/run) hold
on the tree, and each one breaks when a module imports across it: an upward import, a sideways
import between the three lower packages, a heavy library outside its package."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("benchmarks", "pipelines", "validation", "registry", "bentos")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} is missing: install the project's test extra")
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    """The five packages and pyproject.toml, copied (sources only) into a scratch folder."""
    out = tmp_path_factory.mktemp("layering")
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, out / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "results", "*.json"))
    shutil.copy(ROOT / "pyproject.toml", out / "pyproject.toml")
    return out


def test_contracts_hold_on_the_tree():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 kept, 0 broken" in proc.stdout, proc.stdout


@pytest.mark.parametrize(("module", "line", "broken"), [
    # (each package's __init__: present whatever the modules inside are called)
    # upward: a lower package imports pipelines
    ("registry/__init__.py", "from pipelines import config", "Layers"),
    ("validation/__init__.py", "import pipelines.data", "Layers"),
    # upward: pipelines imports benchmarks
    ("pipelines/__init__.py", "import benchmarks.serving", "Layers"),
    # sideways: two lower packages import each other
    ("bentos/__init__.py", "from registry import tags", "Layers"),
    ("registry/__init__.py", "import validation", "Layers"),
    # a heavy library outside its own package
    ("registry/__init__.py", "import great_expectations", "Great Expectations"),
    ("bentos/__init__.py", "import optuna", "Optuna"),
    ("validation/__init__.py", "import bentoml", "BentoML"),
])
def test_a_crossing_import_breaks_a_contract(tree_copy, module, line, broken):
    path = tree_copy / module
    original = path.read_text()
    try:
        path.write_text(original + f"\n{line}  # deliberate crossing\n")
        proc = lint_imports(tree_copy)
    finally:
        path.write_text(original)
    assert proc.returncode != 0, proc.stdout
    assert "1 broken" in proc.stdout, proc.stdout
    broken_section = proc.stdout.split("Broken contracts", 1)[-1]
    assert broken in broken_section, proc.stdout


def test_the_cli_and_a_lock_import_no_heavy_library():
    """``maas --help`` and a lock-taking process (``registry.locks``) start in a fraction of a
    second: the registry's public names load on first use, and the CLI imports each command's
    machinery when it runs."""
    probe = ("import sys, registry.locks, pipelines.cli, registry\n"
             "heavy = sorted(m for m in ('mlflow', 'torch', 'transformers', 'great_expectations',"
             " 'bentoml', 'optuna', 'pandas') if m in sys.modules)\n"
             "assert not heavy, heavy\n"
             "assert callable(registry.promote) and 'mlflow' in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_public_registry_name_survives_its_modules_being_imported_first():
    """No public name of ``registry`` is shadowed by a submodule of the same name (importing a
    submodule sets it as an attribute of the package)."""
    import importlib
    import pkgutil
    import types

    import registry

    for mod in pkgutil.iter_modules(registry.__path__):
        importlib.import_module(f"registry.{mod.name}")
    shadowed = [n for n in registry.__all__ if isinstance(getattr(registry, n), types.ModuleType)]
    assert not shadowed, shadowed


def test_a_wheel_carries_every_package_and_service_requirements():
    """What ``pip install .`` (not editable) packs: every folder of the four installed layers
    that has an ``__init__.py`` is a package, and every service folder's requirements files go
    with it (the bento build reads them)."""
    import tomllib
    from setuptools import find_packages

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["tool"]["setuptools"]
    found = set(find_packages(where=str(ROOT), include=cfg["packages"]["find"]["include"]))
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for layer in ("pipelines", "registry", "bentos", "validation")
               for p in (ROOT / layer).rglob("__init__.py") if "__pycache__" not in p.parts}
    assert on_disk and on_disk <= found, sorted(on_disk - found)
    data = cfg["package-data"]
    for req in (ROOT / "bentos").glob("*/requirements*.txt"):
        package = f"bentos.{req.parent.name}"
        assert "requirements*.txt" in data.get(package, []), package
