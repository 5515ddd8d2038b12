"""scripts/lock.py: pins from `pip freeze` and the check of an environment against the lock."""

from __future__ import annotations

import importlib.util
from importlib import metadata
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "maas_lock_script", Path(__file__).resolve().parents[1] / "scripts" / "lock.py")
lock = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(lock)


@pytest.mark.parametrize("freeze, exclude, expected", [
    ("torch==2.13.0+cpu\n", set(), ["torch==2.13.0"]),
    ("zipp==4.1.2\nGreat_Expectations==1.24.1\nPyYAML==6.0.4\n", set(),
     ["Great_Expectations==1.24.1", "PyYAML==6.0.4", "zipp==4.1.2"]),
    ("pip==23.2.1\nruff==0.17.6\nclick==8.5.1\n", {"pip", "ruff"}, ["click==8.5.1"]),
    ("# Editable Git install with no remote (maas==0.1.0)\n\nclick==8.5.1\n", set(),
     ["click==8.5.1"]),
    ("mytool @ file:///tmp/mytool-1.0-py3-none-any.whl\nclick==8.5.1\n", {"mytool"},
     ["click==8.5.1"]),
])
def test_pins_from_freeze(freeze, exclude, expected):
    assert lock.pins_from_freeze(freeze, exclude) == expected


def test_pins_from_freeze_refuses_a_direct_url_install():
    with pytest.raises(SystemExit, match="mytool @ file:"):
        lock.pins_from_freeze("mytool @ file:///tmp/mytool-1.0-py3-none-any.whl\n", set())


def test_parse_lock_names_the_bad_line(tmp_path):
    path = tmp_path / "constraints.txt"
    path.write_text("# header\nClick==8.5.1  # comment\ntorch>=2\n")
    with pytest.raises(SystemExit, match=r"constraints.txt:3: expected 'name==version'"):
        lock.parse_lock(path)
    path.write_text("# header\nClick==8.5.1  # comment\n")
    assert lock.parse_lock(path) == {"click": ("Click", "8.5.1")}


def _pytest_closure_lock(tmp_path: Path, **override: str) -> Path:
    """A lock of this environment's pytest and its requirements, with versions overridden."""
    names = ["pytest", "iniconfig", "packaging", "pluggy", "pygments"]
    pins = {name: metadata.version(name) for name in names} | override
    path = tmp_path / "constraints.txt"
    path.write_text("".join(f"{name}=={version}\n" for name, version in pins.items()))
    return path


def test_check_passes_when_every_installed_dependency_is_pinned(tmp_path, capsys):
    path = _pytest_closure_lock(tmp_path)
    assert lock.main(["check", "--lock", str(path), "--project", "pytest", "--no-deps"]) == 0
    assert "4 installed dependencies match" in capsys.readouterr().out


def test_check_names_an_unpinned_and_a_wrong_version(tmp_path, capsys):
    path = _pytest_closure_lock(tmp_path, pluggy="0.0.1")
    path.write_text("".join(line + "\n" for line in path.read_text().splitlines()
                            if not line.startswith("iniconfig==")))
    assert lock.main(["check", "--lock", str(path), "--project", "pytest", "--no-deps"]) == 1
    err = capsys.readouterr().err
    assert f"iniconfig {metadata.version('iniconfig')} is installed but not pinned" in err
    assert f"pluggy is {metadata.version('pluggy')}, {path} pins 0.0.1" in err
