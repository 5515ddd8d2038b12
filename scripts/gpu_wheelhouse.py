"""Build the cp312 wheelhouse that lets the GPU machine build and serve a bento (issue 20).

The GPU machine has Python 3.12 with CUDA torch, transformers, tokenizers, onnxruntime, numpy,
pandas (``benchmarks/gpu_device_packages.txt``) but no mlflow, bentoml or package index. This
script walks the dependency closure of ``ROOTS`` through this venv's installed metadata (markers
evaluated for CPython 3.12 on Linux), drops what the device already has, and downloads exactly the
versions pinned in ``constraints.txt`` as cp312 manylinux wheels (``pip download --no-deps``):

    .venv/bin/python scripts/gpu_wheelhouse.py --dest .gpu/whl     # prints the list and sizes

``mlflow-skinny`` (client, registry, SQL store code) instead of the full ``mlflow`` (its server UI
and extras are not needed to register a version and build a bento); SQLAlchemy + alembic for the
embedded SQLite store. Fails (exit 1) when the wheelhouse is over ``--limit-mib`` (48).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("bentoml", "mlflow-skinny", "sqlalchemy", "alembic", "pydantic", "pyyaml", "httpx",
         "tokenizers", "safetensors")
#: dependencies left out on purpose (none: the first try without databricks-sdk failed on the
#: GPU machine, mlflow.genai looks up its namespace package at import)
SKIP: set[str] = set()
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def _env312() -> dict[str, str]:
    env = default_environment()
    env.update(python_version="3.12", python_full_version="3.12.3", sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", implementation_name="cpython",
               platform_python_implementation="CPython", extra="")
    return env


def closure(roots: tuple[str, ...], have: set[str]) -> list[str]:
    """Canonical names reachable from ``roots`` whose distributions the device lacks."""
    env, seen, todo, need = _env312(), set(), [canonicalize_name(r) for r in roots], []
    while todo:
        name = todo.pop()
        if name in seen or name in SKIP:
            continue
        seen.add(name)
        if name not in have:
            need.append(name)
        for spec in metadata.requires(name) or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate(env):
                todo.append(canonicalize_name(req.name))
    return sorted(need)


def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line)
        if m:
            out[canonicalize_name(m.group(1))] = m.group(2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", type=Path, default=REPO / ".gpu" / "whl")
    ap.add_argument("--limit-mib", type=float, default=48.0)
    args = ap.parse_args(argv)
    have_file = REPO / "benchmarks" / "gpu_device_packages.txt"
    have = {canonicalize_name(x.strip()) for x in have_file.read_text().splitlines()
            if x.strip() and not x.startswith("#")}
    need, pinned = closure(ROOTS, have), pins()
    missing = [n for n in need if n not in pinned]
    if missing:
        print(f"not pinned in constraints.txt: {missing}", file=sys.stderr)
        return 1
    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.glob("*.whl"):
        old.unlink()
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", *plat, "-d", str(args.dest),
           *[f"{n}=={pinned[n]}" for n in need]]
    subprocess.run(cmd, check=True)
    wheels = sorted(args.dest.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels) / 2**20
    for w in wheels:
        print(f"{w.stat().st_size / 2**20:7.2f} MiB  {w.name}")
    print(f"{len(wheels)} wheels, {total:.1f} MiB (limit {args.limit_mib:g}) -> {args.dest}")
    return 0 if total <= args.limit_mib else 1


if __name__ == "__main__":
    sys.exit(main())
