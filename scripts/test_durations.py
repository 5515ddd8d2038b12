"""Write tests/durations.json, the seconds each test module took, from a pytest JUnit XML report:

    .venv/bin/python -m pytest --junitxml=/tmp/junit.xml
    .venv/bin/python scripts/test_durations.py /tmp/junit.xml

tests/conftest.py hands the modules to the pytest-xdist workers longest first with it (a module
missing from the file counts as 0 s and goes last): only the order depends on it, never a result.
"""

from __future__ import annotations

import collections
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "durations.json"


def main(report: str) -> None:
    seconds: collections.Counter[str] = collections.Counter()
    for case in ET.parse(report).getroot().iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]  # tests.test_x -> test_x
        seconds[f"{module}.py"] += float(case.get("time") or 0)
    OUT.write_text(json.dumps({m: round(s, 1) for m, s in sorted(seconds.items())}, indent=1)
                   + "\n")
    print(f"{OUT}: {len(seconds)} modules, {sum(seconds.values()):.0f} s")


if __name__ == "__main__":
    main(sys.argv[1])
