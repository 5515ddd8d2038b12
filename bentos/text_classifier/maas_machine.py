"""The machine a figure was measured on: CPU model, the ISA features that decide which variant is
fastest (int8 kernels need VNNI or AMX to pay off; bf16 needs AVX-512 BF16 or AMX), and the
thread count.

Standard library only and no imports from the ``bentos`` package: it lives in the text
classifier's service folder, so the bento build copies it into every bento beside ``service.py``
(which compares the serving CPU with the one the variant was chosen on); pipelines, benchmarks and
the build import it as ``bentos.machine``.

``describe()`` -> ``{"cpu_model": str, "features": {"avx2": bool, "avx512f": bool, "vnni": bool,
"bf16": bool, "amx": bool}, "threads": int}``; ``differs(recorded, current)`` names the features
that differ (empty: same kind of CPU, or nothing recorded to compare with); ``recheck(...)`` times
candidate models here (interleaved rounds, bounded in time) and names the fastest, once per
``bentoml serve`` (its workers share the result through a locked file).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger("bentoml.maas.text_classifier")

CPUINFO = Path("/proc/cpuinfo")
#: feature name -> /proc/cpuinfo flags, any one of which means the feature is there
FEATURES: dict[str, tuple[str, ...]] = {
    "avx2": ("avx2",),
    "avx512f": ("avx512f",),
    "vnni": ("avx512_vnni", "avx_vnni"),
    "bf16": ("avx512_bf16",),
    "amx": ("amx_tile", "amx_int8", "amx_bf16"),
}


def parse_cpuinfo(text: str) -> tuple[str, set[str]]:
    """(CPU model name, flags) of the first processor in ``/proc/cpuinfo`` text (x86 ``flags``;
    other architectures' ``Features``/``CPU part`` lines give the model and flags they have)."""
    model, flags = "", set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def features_of(flags: set[str]) -> dict[str, bool]:
    """The features that matter, from a set of CPU flags."""
    return {name: any(f in flags for f in names) for name, names in FEATURES.items()}


def threads() -> int:
    """CPU threads this process may run on (its affinity mask, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def describe(cpuinfo: Path = CPUINFO) -> dict[str, Any]:
    """The machine this process runs on (see the module docstring)."""
    try:
        model, flags = parse_cpuinfo(cpuinfo.read_text("utf-8", errors="replace"))
    except OSError:
        model, flags = "", set()
    return {"cpu_model": model or platform.processor() or platform.machine() or "unknown",
            "features": features_of(flags), "threads": threads()}


def feature_names(machine: dict[str, Any] | None) -> list[str]:
    """The features a recorded machine has, e.g. ``["avx2", "avx512f", "vnni"]``."""
    feats = (machine or {}).get("features") or {}
    return [name for name in FEATURES if feats.get(name)]


def differs(recorded: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """Features present on one machine and not the other, e.g. ``["-vnni", "+amx"]`` (``-``: the
    recorded machine had it, this one lacks it). Empty when nothing was recorded (no basis for a
    comparison) or when the feature sets match."""
    feats = (recorded or {}).get("features")
    if not isinstance(feats, dict):
        return []
    now = current.get("features") or {}
    out = []
    for name in FEATURES:
        was, is_ = bool(feats.get(name)), bool(now.get(name))
        if was != is_:
            out.append(("+" if is_ else "-") + name)
    return out


def summary(machine: dict[str, Any] | None) -> str:
    """One line for logs and cards: ``AMD EPYC (avx2; 2 threads)``."""
    if not machine:
        return "unknown machine"
    feats = ", ".join(feature_names(machine)) or "no AVX2/AVX-512/VNNI/BF16/AMX"
    cpu = machine.get("cpu_model") or "unknown CPU"
    return f"{cpu} ({feats}; {machine.get('threads')} threads)"


def measure(models: dict[str, Any], texts: list[str], budget_s: float,
            rounds: int = 3) -> dict[str, float]:
    """Median texts/s of each model's ``probabilities(texts)`` here: one warm call each, then up
    to ``rounds`` interleaved rounds, stopping early once ``budget_s`` is spent (at least one)."""
    for model in models.values():
        model.probabilities(texts)
    speeds: dict[str, list[float]] = {name: [] for name in models}
    deadline = time.monotonic() + budget_s
    for _ in range(max(1, rounds)):
        for name, model in models.items():
            start = time.perf_counter()
            model.probabilities(texts)
            speeds[name].append(len(texts) / max(time.perf_counter() - start, 1e-9))
        if time.monotonic() > deadline:
            break
    return {name: round(statistics.median(v), 2) for name, v in speeds.items()}


def fastest(speeds: dict[str, float], incumbent: str, margin: float = 0.05) -> str:
    """The fastest name; the incumbent (the recorded choice) unless another beats it by more
    than ``margin`` (the timing noise of a short check)."""
    best = max(speeds, key=speeds.__getitem__)
    return incumbent if speeds.get(incumbent, 0.0) * (1 + margin) >= speeds[best] else best


def recheck(loaders: dict[str, Callable[[], Any]], incumbent: str, texts: list[str],
            budget_s: float, key: str | None = None) -> tuple[str, Any, dict[str, Any]]:
    """Time the models ``loaders`` make on this machine and pick the one to serve:
    ``(name, its loaded model, {"texts_per_s": {...}, "seconds": s, "measured_here": bool})``.

    With ``key``, the first process to get here measures and the others (the workers of one
    ``bentoml serve``) wait for and reuse its result, loading only the winner: one check per
    server, and workers that never disagree."""
    if key is None:
        return _measure_all(loaders, incumbent, texts, budget_s)
    import fcntl

    path = Path(tempfile.gettempdir()) / f"maas-machine-check-{key}.json"
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            result = json.loads(path.read_text("utf-8"))
            name = result["served"]
            return name, loaders[name](), {**result, "measured_here": False}
        name, model, result = _measure_all(loaders, incumbent, texts, budget_s)
        path.write_text(json.dumps({k: v for k, v in result.items() if k != "measured_here"}),
                        "utf-8")
        return name, model, result


def _measure_all(loaders: dict[str, Callable[[], Any]], incumbent: str, texts: list[str],
                 budget_s: float) -> tuple[str, Any, dict[str, Any]]:
    start = time.monotonic()
    models = {name: load() for name, load in loaders.items()}
    speeds = measure(models, texts, budget_s)
    name = fastest(speeds, incumbent)
    result = {"texts_per_s": speeds, "served": name,
              "seconds": round(time.monotonic() - start, 2), "measured_here": True}
    return name, models[name], result


def choose(check: dict[str, Any], variant: dict[str, Any],
           loader: Callable[[dict[str, Any], str | None], Callable[[], Any]],
           key: str | None) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """The serving side of the check (``service.py``): ``check`` is ``bento_config.json``'s
    ``machine_check`` (``recorded`` machine, ``candidates`` {name: {variant, folder}}, ``texts``,
    ``budget_s``), ``variant`` the bento's own, ``loader(variant, folder)`` a loader of a runtime.
    Returns (loaded runtime, its variant, what ``/metadata`` reports)."""
    here, recorded = describe(), check.get("recorded")
    candidates = check.get("candidates") or {}
    changed = differs(recorded, here)
    own = variant.get("name") or "fp32"
    info: dict[str, Any] = {"machine": here, "chosen_on": recorded, "differs": changed,
                            "rechecked": False, "chosen": own, "served": own}
    if not changed or not candidates:
        info["status"] = ("no machine recorded for the choice" if recorded is None else
                          "same CPU features as the choice" if not changed else
                          "CPU features differ, but no other variant within budget to time")
        return loader(variant, None)(), variant, info
    variants = {own: variant, **{n: c["variant"] for n, c in candidates.items()}}
    loaders = {own: loader(variant, None),
               **{n: loader(c["variant"], c["folder"]) for n, c in candidates.items()}}
    texts = check.get("texts") or ["a short example text"] * 8
    safe_key = None if key is None else "".join(
        ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{key}-{'-'.join(changed)}")
    name, model, result = recheck(loaders, own, texts, float(check.get("budget_s") or 20.0),
                                  safe_key)
    info.update(result, rechecked=True, served=name,
                status=f"CPU features differ ({', '.join(changed)}): timed "
                       f"{', '.join(loaders)} here, serving {name}")
    logger.warning("machine check: this CPU (%s) is not the one variant %s was chosen on (%s); "
                   "texts/s here %s: serving %s", summary(here), own, summary(recorded),
                   result["texts_per_s"], name)
    return model, variants[name], info
