"""The suite's own scheduling: modules are handed to the pytest-xdist workers longest first
(``tests/durations.json``), each module's tests kept in their order, unknown modules last."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from conftest import _longest_modules_first

DURATIONS = Path(__file__).with_name("durations.json")


def _items(*names: str) -> list:
    return [SimpleNamespace(path=Path(f"tests/{n.split(':')[0]}.py"), name=n) for n in names]


def test_longest_module_first_and_each_module_kept_in_order():
    seconds = json.loads(DURATIONS.read_text())
    long, short = "test_distributed", "test_config"
    assert seconds[f"{long}.py"] > seconds[f"{short}.py"]
    items = _items(f"{short}:a", f"{short}:b", "test_not_in_the_file:x", f"{long}:c",
                   f"{long}:d")
    _longest_modules_first(items)
    assert [i.name for i in items] == [f"{long}:c", f"{long}:d", f"{short}:a", f"{short}:b",
                                       "test_not_in_the_file:x"]


def test_every_test_module_has_a_duration():
    """A new module without a figure would go last: refresh with scripts/test_durations.py."""
    seconds = json.loads(DURATIONS.read_text())
    modules = {p.name for p in Path(__file__).parent.glob("test_*.py")}
    missing = sorted(modules - set(seconds))
    assert not missing, missing
