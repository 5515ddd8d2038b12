"""A bounded load from ``wrk`` (C, one thread, keep-alive) against ``/classify`` on 127.0.0.1.

On a 2-core box the load generator shares the cores with the server: the Python generator
(``bentos.loadgen``, aiohttp) spends ~0.27 ms of CPU per request (its httpx predecessor spent
3.1-3.5 ms, more than the model), ``wrk`` less still. Each request body is one of
the prepared payloads (cycled); the run is bounded by ``duration_s`` and ``concurrency``
connections. Returns the same keys as ``bentos.loadgen.LoadResult.summary()``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

SCRIPT = r"""
local bodies = {}
for line in io.lines(os.getenv("MAAS_WRK_BODIES")) do bodies[#bodies + 1] = line end
local i = 0
request = function()
  i = i % #bodies + 1
  return wrk.format("POST", "/classify", {["Content-Type"] = "application/json"}, bodies[i])
end
done = function(summary, latency, requests)
  io.write(string.format(
    'MAAS_WRK {"requests": %d, "duration_us": %d, "status_errors": %d, "connect": %d, ' ..
    '"read": %d, "write": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


def available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(url: str, payloads: Sequence[Sequence[str]], *, concurrency: int,
            duration_s: float, timeout_s: float = 60.0) -> dict[str, Any]:
    """Drive ``url`` (``http://127.0.0.1:PORT``) for ``duration_s`` seconds."""
    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"load tests only go to 127.0.0.1, not {host}")
    with tempfile.TemporaryDirectory(prefix="maas-wrk-") as tmp:
        bodies, script = Path(tmp) / "bodies.jsonl", Path(tmp) / "post.lua"
        bodies.write_text("".join(json.dumps({"texts": list(p)}) + "\n" for p in payloads))
        script.write_text(SCRIPT)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(
            ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s",
             f"--timeout={int(timeout_s)}s", "-s", str(script), url + "/classify"],
            env={**os.environ, "MAAS_WRK_BODIES": str(bodies)}, capture_output=True,
            text=True, timeout=duration_s + timeout_s + 30, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("MAAS_WRK "))
    r = json.loads(line[len("MAAS_WRK "):])
    wall = r["duration_us"] / 1e6
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    texts_per_request = sum(len(p) for p in payloads) / len(payloads)
    transport = r["connect"] + r["read"] + r["write"] + r["timeout"]
    ok = r["requests"] - r["status_errors"]
    return {
        "url": url, "loadgen": "wrk", "requests": r["requests"], "concurrency": concurrency,
        "wall_s": round(wall, 3), "ok": ok,
        # wrk counts non-2xx/3xx answers without their codes: all are counted as 5xx here
        # (stricter than needed for the "zero 5xx" target)
        "statuses": {"2xx": ok, "non-2xx": r["status_errors"]},
        "server_errors": r["status_errors"], "malformed": 0, "transport_errors": transport,
        "not_sent": 0, "throughput_rps": round(ok / wall, 2),
        "texts_per_s": round(ok * texts_per_request / wall, 2),
        "p50_ms": r["p50_us"] / 1000, "p90_ms": r["p90_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000, "loadgen_cpu_s": round(cpu, 3),
        "loadgen_cores": round(cpu / wall, 3) if wall else 0.0, "error_samples": [],
        "texts_ok": ok * texts_per_request,
    }
