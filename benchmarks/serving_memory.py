"""Memory of ``bentoml serve`` of a registered model: RSS, USS and PSS summed over the server's
whole process tree (the ``bentoml serve`` supervisor and its workers), sampled every 50 ms.

    .venv/bin/python benchmarks/serving_memory.py     # models:/<sentiment.yaml model>@champion,
                                                       # 2 workers, tracking store of the cwd
    .venv/bin/python benchmarks/serving_memory.py --workers 2 --requests 800 --concurrency 32

The same three moments are measured for BentoML's floor first: a service with no model (one
API returning a constant, the same worker count), so the table shows what the model's runtime
adds to what BentoML itself holds.

Three moments: ``ready`` (``/readyz`` answered), ``peak`` (the highest sample while a bounded
load of SST-2 test texts runs: ``--requests`` requests of ``--texts-per-request`` texts at
``--concurrency``, on 127.0.0.1) and ``rest`` (the load over and the tree idle:
``serving_drive.wait_idle``). RSS counts a page shared by several
processes (the Python runtime, shared libraries) once per process, PSS splits it between them,
USS counts only what one process alone holds. Writes
``benchmarks/results/serving-memory-<UTC time>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from benchmarks.serving import default_model_uri, read_tsv  # noqa: E402
from benchmarks.serving_drive import tree_memory, wait_idle  # noqa: E402


class Sampler:
    """Samples :func:`tree_memory` every ``every_s`` seconds in a thread; keeps the peak RSS."""

    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        self.pid, self.every_s, self.peak = pid, every_s, {"rss": 0.0}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            m = tree_memory(self.pid)
            self.samples += 1
            if m["rss"] > self.peak["rss"]:
                self.peak = m
            self._stop.wait(self.every_s)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def at_rest(pid: int) -> dict[str, Any]:
    """Tree memory once the tree is idle (no request in flight, at most 15 s)."""
    wait_idle(pid)
    return tree_memory(pid)


#: the floor: a BentoML service with no model, one API, ``workers`` worker processes
FLOOR_SERVICE = """import bentoml


@bentoml.service(workers={workers})
class Floor:
    @bentoml.api(route="/classify")
    def classify(self, texts: list[str]) -> list[dict]:
        return [{{"label": "positive", "probabilities": {{"positive": 1.0}}}} for _ in texts]
"""


def moments(srv, payloads: list[list[str]], args: argparse.Namespace) -> dict[str, Any]:
    """Tree memory when ready, at the peak of a bounded load, and at rest after it."""
    from bentos.loadgen import load

    pid = srv.process.pid
    out: dict[str, Any] = {"ready": at_rest(pid)}
    with Sampler(pid) as sampler:
        result = load(f"{srv.url}/classify", payloads, requests=args.requests,
                      concurrency=args.concurrency, time_budget_s=args.budget_s)
    out.update(peak=sampler.peak, samples=sampler.samples, rest=at_rest(pid))
    out["load"] = {k: v for k, v in result.summary().items()
                   if k in ("requests", "texts_per_s", "statuses", "server_errors", "p50_ms",
                            "p99_ms", "wall_s")}
    return out


def floor(payloads: list[list[str]], args: argparse.Namespace) -> dict[str, Any]:
    """:func:`moments` of BentoML's own processes serving no model."""
    import tempfile

    from bentos.server import serve_bento

    with tempfile.TemporaryDirectory(prefix="maas-floor-") as tmp:
        Path(tmp, "floor_service.py").write_text(FLOOR_SERVICE.format(workers=args.workers))
        with serve_bento("floor_service:Floor", cwd=tmp) as srv:
            return moments(srv, payloads, args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bentos import BentoSettings, build_bento
    from bentos.machine import describe
    from bentos.server import serve_bento

    model_uri = args.model_uri or default_model_uri()
    texts, _ = read_tsv(REPO / "data" / "sst2" / "test.tsv")
    k = args.texts_per_request
    payloads = [texts[i:i + k] for i in range(0, len(texts) - k + 1, k)]
    built = build_bento(model_uri, BentoSettings(workers=args.workers, variant=args.variant))
    report: dict[str, Any] = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": describe(), "model_uri": model_uri, "bento": built.bento_tag,
        "variant": built.variant, "runtime": built.runtime, "args": vars(args)}
    report["floor"] = floor(payloads, args)
    with serve_bento(built.bento_tag) as srv:
        report.update(moments(srv, payloads, args))
    report["target"] = {"rss_mib_max": args.target_mib,
                        "met_at_rest": report["rest"]["rss"] <= args.target_mib,
                        "met_at_peak": report["peak"]["rss"] <= args.target_mib}
    return report


def table(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"bento {report['bento']} ({report['variant']}, {report['runtime']}), "
             f"{report['args']['workers']} workers; CPU {m.get('cpu_model')} "
             f"({', '.join(k for k, on in (m.get('features') or {}).items() if on)}), "
             f"{m.get('threads')} threads",
             "| moment | RSS MiB | PSS MiB | USS MiB | RSS per process (supervisor, workers) |",
             "|---|---:|---:|---:|---|"]
    for who, src in (("bento", report), ("BentoML floor, no model", report["floor"])):
        for moment in ("ready", "peak", "rest"):
            r = src[moment]
            lines.append(f"| {who}: {moment} | {r['rss']} | {r['pss']} | {r['uss']} | "
                         f"{' / '.join(str(x) for x in r['processes'])} |")
    ld = report["load"]
    lines.append(f"load: {ld['requests']} requests, {ld['texts_per_s']} texts/s, statuses "
                 f"{ld['statuses']}; target RSS <= {report['target']['rss_mib_max']} MiB: "
                 f"at rest {report['target']['met_at_rest']}, at peak "
                 f"{report['target']['met_at_peak']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-uri", help="models:/NAME@ALIAS (default: the sentiment pipeline's "
                   "model @champion)")
    p.add_argument("--variant", help="serve this variant (default: the version's chosen one)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--requests", type=int, default=800)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--budget-s", type=float, default=120.0, help="time cap of the load")
    p.add_argument("--target-mib", type=float, default=300.0)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    report = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"serving-memory-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", "utf-8")
    print(table(report) + f"\n\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
