"""A bounded load on a running bento, and what it cost: texts/s, latency percentiles, statuses,
the mean model batch (``maas_classify_batch_texts``) and the CPU seconds the server's process
tree and the load generator each spent (their own counters); the tree's memory. Used by
``benchmarks/serving.py``, ``serving_memory.py`` and ``images.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

MIB = 1024 * 1024


def process_tree(pid: int) -> list:
    """``psutil.Process`` of ``pid`` and of all its descendants (none once it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` and all its descendants."""
    import psutil

    total = 0.0
    for p in process_tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def tree_memory(pid: int) -> dict[str, Any]:
    """RSS, USS and PSS (MiB) of ``pid`` and its descendants, and each process's RSS."""
    import psutil

    total = {"rss": 0.0, "uss": 0.0, "pss": 0.0}
    each = []
    for p in process_tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            m = p.memory_full_info()
            for key in total:
                total[key] += getattr(m, key) / MIB
            each.append(round(m.rss / MIB, 1))
    return {**{k: round(v, 1) for k, v in total.items()}, "processes": each}


def wait_idle(pid: int, quiet_s: float = 0.2, limit_s: float = 15.0) -> float:
    """Wait until the server's process tree has spent under 5% of a core over ``quiet_s`` (the
    requests a load left in flight are done), at most ``limit_s``; returns the seconds waited."""
    start = time.monotonic()
    last = tree_cpu_s(pid)
    while time.monotonic() - start < limit_s:
        time.sleep(quiet_s)
        now = tree_cpu_s(pid)
        if now - last < 0.05 * quiet_s:
            break
        last = now
    return time.monotonic() - start


def batch_metric(url: str) -> tuple[float, float]:
    """(sum, count) of ``maas_classify_batch_texts`` over all workers."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("maas_classify_batch_texts_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("maas_classify_batch_texts_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def drive(srv, payloads: list[list[str]], requests: int, concurrency: int,
          budget_s: float, loadgen: str = "python", duration_s: float = 15.0) -> dict[str, Any]:
    """One bounded load on the server: ``wrk`` for ``duration_s`` seconds, or the Python
    generator for ``requests`` requests (capped at ``budget_s``). Returns once the server is
    idle again: ``wrk`` stops with requests in flight, and what the server still does for them
    would share the cores with whatever is measured next."""
    s0, n0 = batch_metric(srv.url)
    cpu0 = tree_cpu_s(srv.process.pid)
    out = _load(srv.url, payloads, requests, concurrency, budget_s, loadgen, duration_s)
    server_cpu = tree_cpu_s(srv.process.pid) - cpu0
    wait_idle(srv.process.pid)
    s1, n1 = batch_metric(srv.url)
    wall, texts_ok = out["wall_s"], out.pop("texts_ok")
    out.update(loadavg=os.getloadavg()[0],
               mean_batch=round((s1 - s0) / (n1 - n0), 2) if n1 > n0 else None,
               model_calls=int(n1 - n0), server_cpu_s=round(server_cpu, 2),
               server_cores=round(server_cpu / wall, 2) if wall else 0.0,
               server_cpu_ms_per_text=round(1000 * server_cpu / texts_ok, 2)
               if texts_ok else None,
               loadgen_cpu_ms_per_text=round(1000 * out["loadgen_cpu_s"] / texts_ok, 2)
               if texts_ok else None)
    out["p99_over_p50"] = round(out["p99_ms"] / out["p50_ms"], 2) if out["p50_ms"] else None
    print(f"  c={concurrency:<3} {out['texts_per_s']:7.1f} texts/s  p50 {out['p50_ms']:7.1f} "
          f"p99 {out['p99_ms']:7.1f} ms  batch {out['mean_batch']}  cores: server "
          f"{out['server_cores']} {loadgen} {out['loadgen_cores']}  {out['statuses']}",
          flush=True)
    return out


def _load(url: str, payloads, requests: int, concurrency: int, budget_s: float, loadgen: str,
          duration_s: float) -> dict[str, Any]:
    if loadgen == "wrk":
        from benchmarks.wrk_load import run_wrk

        return run_wrk(url, payloads, concurrency=concurrency, duration_s=duration_s)
    from bentos.loadgen import run_load

    r = asyncio.run(run_load(f"{url}/classify", payloads, requests=requests,
                             concurrency=concurrency, time_budget_s=budget_s,
                             request_timeout_s=60))
    return {**r.summary(), "loadgen": "python", "texts_ok": r.texts_ok,
            "errors": r.requests - r.ok - r.not_sent}


