"""Serving benchmark: ``bentoml serve`` of the champion's chosen variant against the machine limit.

    .venv/bin/python benchmarks/serving.py          # models:/<sentiment.yaml model>@champion,
                                                    # tracking store sqlite:///mlflow.db (cwd)
    .venv/bin/python benchmarks/serving.py --model-uri models:/sst2-sentiment@champion \\
        --variant onnx-int8 --requests 600 --concurrency 1,8,32,64

Sections (all on 127.0.0.1; every load is bounded in requests and time):
1. machine limit: the served variant in-process (the bento's own ``predict_texts``: tokenise,
   forward, softmax), all cores, no HTTP, at batch sizes ``--limit-batches``: the best texts/s.
2. search: a few served configurations (runtime threads, workers, ``max_batch_size``), each
   built, started and driven at concurrency ``--search-concurrency`` for ``--search-requests``
   requests; the best one (texts/s, with zero 5xx and p99 <= 3x p50) is kept. Nothing about
   threads, workers or batching is fixed in advance.
3. the kept configuration at each ``--concurrency`` level: texts/s, p50/p99, statuses, the mean
   model batch (texts per model call, from ``maas_classify_batch_texts``), and the CPU the
   server and the load generator each used (they share the machine's cores).

The load generator (``bentos.loadgen``): httpx async, one keep-alive connection per concurrent
client, bodies encoded once, ``--texts-per-request`` texts per request (default 1).
Writes ``benchmarks/results/serving-<UTC time>.json`` (``verdict.served_over_machine_limit``)
and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO / "data" / "sst2"
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_PIPELINE = REPO / "pipelines" / "sentiment.yaml"
sys.path.insert(0, str(REPO))  # run as a script from a checkout

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
               "TOKENIZERS_PARALLELISM": "false", "BENTOML_DO_NOT_TRACK": "True",
               "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}.items():
    os.environ.setdefault(_k, _v)


def _cpu() -> dict:
    """The CPU this ran on: model, ISA features (AVX2, AVX-512, VNNI, BF16, AMX), threads."""
    from bentos.machine import describe

    return {"cpu": describe()}


def read_tsv(path: Path) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    for row in path.read_text("utf-8").splitlines()[1:]:
        if "\t" in row:
            text, label = row.rsplit("\t", 1)
            texts.append(text.strip())
            labels.append(int(label))
    return texts, labels


def default_model_uri() -> str:
    """``models:/<registry.model_name of pipelines/sentiment.yaml>@champion``."""
    import yaml

    cfg = yaml.safe_load(DEFAULT_PIPELINE.read_text("utf-8"))
    return f"models:/{cfg['registry']['model_name']}@champion"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# -- 1: machine limit --------------------------------------------------------------------------
def in_process(svc, texts: list[str], batch_size: int, min_s: float = 4.0,
               max_batches: int = 400) -> dict[str, Any]:
    batches = [texts[i:i + batch_size] for i in range(0, len(texts) - batch_size + 1,
                                                      batch_size)]
    svc.predict_texts(batches[0])  # warm-up
    done, n, cpu0, t0 = 0, 0, time.process_time(), time.perf_counter()
    while n < max_batches and (time.perf_counter() - t0 < min_s or n < 3):
        svc.predict_texts(batches[n % len(batches)])
        done += batch_size
        n += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"batch_size": batch_size, "batches": n, "texts": done, "wall_s": round(wall, 3),
            "texts_per_s": round(done / wall, 1), "cores": round(cpu / wall, 2),
            "cpu_ms_per_text": round(1000 * cpu / done, 2)}


def machine_limit(bento_tag: str, texts: list[str], sizes: list[int],
                  forward_sizes: list[int]) -> dict[str, Any]:
    """The bento's service in this process with every core, at each model-call batch size and
    each forward-pass size (texts sorted by length, passes of that many texts)."""
    from bentos.testing import load_service

    rows = []
    for fbs in forward_sizes:
        _, svc = load_service(bento_tag, torch_threads=cores(), forward_batch_size=fbs)
        for size in sizes:
            if size < fbs and size > 1 and fbs != forward_sizes[0]:
                continue  # the same passes as a smaller forward size
            rows.append({**in_process(svc, texts, size), "forward_batch_size": fbs})
            print(f"  batch {size:>3} forward {fbs:>3}: {rows[-1]['texts_per_s']:7.1f} "
                  "texts/s", flush=True)
    best = max(rows, key=lambda r: r["texts_per_s"])
    info = {k: svc.info.get(k) for k in ("variant", "runtime", "dtype", "providers",
                                         "variant_accuracy", "variant_accuracy_drop",
                                         "model_name", "model_version")}
    return {"threads": svc.info["threads"], "info": info, "by_batch": rows,
            "best_batch": best["batch_size"], "texts_per_s": best["texts_per_s"],
            "best_forward_batch_size": best["forward_batch_size"]}


# -- 2 and 3: served ---------------------------------------------------------------------------
def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` and all its descendants."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


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
    generator for ``requests`` requests (capped at ``budget_s``)."""
    s0, n0 = batch_metric(srv.url)
    cpu0 = tree_cpu_s(srv.process.pid)
    out = _load(srv.url, payloads, requests, concurrency, budget_s, loadgen, duration_s)
    server_cpu = tree_cpu_s(srv.process.pid) - cpu0
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


@contextlib.contextmanager
def served(model_uri: str, config: dict[str, Any], args, workdir: Path, tag: str):
    """Build the bento for ``config`` and serve it; yields (server, build result)."""
    from bentos import BentoSettings, build_bento
    from bentos.server import serve_bento

    settings = BentoSettings(max_latency_ms=args.max_latency_ms, timeout=60.0,
                             max_texts=max(64, args.texts_per_request),
                             max_concurrency=args.max_concurrency, variant=args.variant,
                             **config)
    built = build_bento(model_uri, settings)
    with serve_bento(built.bento_tag, log_path=workdir / f"server-{tag}.log") as srv:
        yield srv, built


def warm_up(srv, payloads: list[list[str]]) -> None:
    """Not measured; also trains BentoML's batching cost model on batches of several sizes."""
    from bentos.loadgen import run_load

    for c in (1, 8, 32):
        asyncio.run(run_load(f"{srv.url}/classify", payloads, requests=4 * c + 8,
                             concurrency=c, time_budget_s=60))


def candidates(n_cores: int, sizes: list[int], fbs: int) -> list[dict[str, Any]]:
    """Served configurations to try: every core for the model vs one left to the event loop,
    one worker vs one per core (each with one runtime thread, or with every core: the runtimes
    do not spin, so one worker's model call can use the cores the other spends on HTTP), and
    each batch cap; forward passes of the size that gave the machine limit."""
    out = []
    for threads in sorted({n_cores, max(1, n_cores - 1)}, reverse=True):
        for size in sizes:
            out.append({"torch_threads": threads, "workers": 1, "max_batch_size": size,
                        "forward_batch_size": fbs})
    if n_cores > 1:
        for threads in (1, n_cores):
            out.append({"torch_threads": threads, "workers": n_cores,
                        "max_batch_size": sizes[0], "forward_batch_size": fbs})
    return out


def search(model_uri: str, args, workdir: Path, payloads, fbs: int) -> dict[str, Any]:
    """Each candidate, then the best one without BentoML's access log (a line per request:
    kept only if it pays, since operators may want it); the fastest acceptable one wins."""
    tried: list[dict[str, Any]] = []

    def attempt(config: dict[str, Any]) -> None:
        print(f"  config {config}", flush=True)
        with served(model_uri, config, args, workdir, f"search{len(tried)}") as (srv, _):
            warm_up(srv, payloads)
            r = drive(srv, payloads, args.search_requests, args.search_concurrency,
                      args.budget_s, args.loadgen, args.duration_s)
        tried.append({"config": config, **r})

    def best() -> dict[str, Any]:
        ok = [t for t in tried if t["server_errors"] == 0 and (t["p99_over_p50"] or 99) <= 3]
        return max(ok or tried, key=lambda t: t["texts_per_s"])

    for config in candidates(cores(), args.search_batch_sizes, fbs):
        attempt(config)
    attempt({**best()["config"], "access_log": False})
    return {"tried": tried, "best": best()["config"]}


# -- main ----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime
    import torch

    from bentos import BentoSettings, build_bento

    model_uri = args.model_uri or default_model_uri()
    texts, _ = read_tsv(SST2 / "test.tsv")
    payloads = [texts[i:i + args.texts_per_request]
                for i in range(0, len(texts) - args.texts_per_request + 1,
                               args.texts_per_request)]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="maas-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": cores(), "platform": platform.platform(),
                    "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                    "cuda": torch.cuda.is_available(), "python": platform.python_version(),
                    "loadavg_start": os.getloadavg(), **_cpu()},
        "args": vars(args), "model_uri": model_uri,
        "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI", ""),
    }
    t_all = time.perf_counter()
    print(f"1. machine limit of {model_uri} (variant {args.variant or 'chosen'}) ...", flush=True)
    built = build_bento(model_uri, BentoSettings(variant=args.variant))
    report["machine_limit"] = machine_limit(built.bento_tag, texts, args.limit_batches,
                                            args.forward_batches)
    report["variant"] = report["machine_limit"].pop("info")
    print(f"  machine limit {report['machine_limit']['texts_per_s']} texts/s at batch "
          f"{report['machine_limit']['best_batch']}", flush=True)
    if args.config:
        report["search"] = {"tried": [], "best": json.loads(args.config)}
    else:
        print("2. choosing the served configuration ...", flush=True)
        report["search"] = search(model_uri, args, workdir, payloads,
                                  report["machine_limit"]["best_forward_batch_size"])
    best = report["search"]["best"]
    print(f"3. bentoml serve with {best} ...", flush=True)
    with served(model_uri, best, args, workdir, "final") as (srv, built):
        report["bento"] = {"tag": built.bento_tag, "settings": built.settings}
        warm_up(srv, payloads)
        report["served"] = [drive(srv, payloads, args.requests, c, args.budget_s,
                                  args.loadgen, args.duration_s) for c in args.concurrency]
    report["wall_s"] = round(time.perf_counter() - t_all, 1)
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["verdict"] = verdict(report)
    return report


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    limit = report["machine_limit"]["texts_per_s"]
    served = {r["concurrency"]: r for r in report["served"]}
    at = served.get(32) or max(served.values(), key=lambda r: r["concurrency"])
    n = report["machine"]["cpus"]
    # the load generator runs on the same cores: the limit for what is left to the server
    left = max(0.0, n - at["loadgen_cores"]) / n
    out: dict[str, Any] = {
        "concurrency": at["concurrency"],
        "served_texts_per_s": at["texts_per_s"],
        "machine_limit_texts_per_s": limit,
        "served_over_machine_limit": round(at["texts_per_s"] / limit, 3),
        "loadgen_cores": at["loadgen_cores"], "server_cores": at["server_cores"],
        "served_over_limit_on_cores_left_by_loadgen": round(at["texts_per_s"] / (limit * left),
                                                            3) if left else None,
        "mean_batch": at["mean_batch"],
        # CPU per text, independent of what else runs on the box
        "limit_cpu_ms_per_text": min(
            (r for r in report["machine_limit"]["by_batch"]),
            key=lambda r: -r["texts_per_s"])["cpu_ms_per_text"],
        "server_cpu_ms_per_text": at["server_cpu_ms_per_text"],
        "loadgen_cpu_ms_per_text": at["loadgen_cpu_ms_per_text"],
        "served_5xx": sum(r["server_errors"] for r in served.values()),
        "p99_over_p50": {c: r["p99_over_p50"] for c, r in served.items()},
    }
    # server CPU-ms per text over in-process CPU-ms per text: what serving costs beyond the
    # model, from the processes' own counters (independent of what else shares the cores)
    out["cpu_ratio"] = (round(out["server_cpu_ms_per_text"] / out["limit_cpu_ms_per_text"], 3)
                        if out["limit_cpu_ms_per_text"] else None)
    out["targets"] = {
        "served >= 0.8 x machine limit at c=32": out["served_over_machine_limit"] >= 0.8,
        "cpu_ratio <= 1.25": (out["cpu_ratio"] or 99) <= 1.25,
        "p99 <= 3 x p50 at c=32": (at["p99_over_p50"] or 99) <= 3,
        "zero 5xx": out["served_5xx"] == 0,
    }
    return out


def table(report: dict[str, Any]) -> str:
    m, lim, v = report["machine"], report["machine_limit"], report["variant"]
    lines = [(f"model: {report['model_uri']} v{v['model_version']}, variant {v['variant']} "
             f"({v['runtime']}, {v['dtype']}, {v['providers'] or ''})"),
             (f"machine: {m['cpus']} CPUs, load average start/end {m['loadavg_start'][0]:.1f}/"
             f"{m['loadavg_end'][0]:.1f}"),
             f"machine limit (in-process, {lim['threads']} threads): " + ", ".join(
                 f"b{r['batch_size']}/f{r['forward_batch_size']} {r['texts_per_s']}"
                 for r in lim["by_batch"])
             + f" -> {lim['texts_per_s']} texts/s at batch {lim['best_batch']} (forward "
               f"{lim['best_forward_batch_size']})", ""]
    header = ("| config (threads, workers, max batch, forward) | conc. | texts/s | p50 ms "
              "| p99 ms | p99/p50 | mean batch | server cores | loadgen cores | statuses |")
    lines += [header, "|" + "---|" * 10]
    rows = [(t["config"], t) for t in report["search"]["tried"]]
    rows += [(report["search"]["best"], r) for r in report["served"]]
    for config, r in rows:
        cfg = (f"t{config.get('torch_threads')} w{config.get('workers')} "
               f"b{config.get('max_batch_size')} f{config.get('forward_batch_size')}"
               + (" no-access-log" if config.get("access_log") is False else ""))
        lines.append(f"| {cfg} | {r['concurrency']} | {r['texts_per_s']:.1f} | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['p99_over_p50']} | "
                     f"{r['mean_batch']} | {r['server_cores']} | {r['loadgen_cores']} | "
                     f"{', '.join(f'{k}: {n}' for k, n in r['statuses'].items())} |")
    vd = report["verdict"]
    lines += ["", (f"served / machine limit at c={vd['concurrency']}: "
              f"{vd['served_over_machine_limit']} (on the cores the load generator leaves: "
              f"{vd['served_over_limit_on_cores_left_by_loadgen']}); 5xx: {vd['served_5xx']}"),
              (f"CPU ms per text: in-process best {vd['limit_cpu_ms_per_text']}, served "
              f"(server) {vd['server_cpu_ms_per_text']} + load generator "
              f"{vd['loadgen_cpu_ms_per_text']}")]
    lines += [f"  [{'x' if ok else ' '}] {name}" for name, ok in vd["targets"].items()]
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args(argv: list[str]) -> argparse.Namespace:
    ints = _ints
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-uri", help="models:/NAME@ALIAS in MLFLOW_TRACKING_URI's registry "
                   "(default: the sentiment pipeline's model @champion)")
    p.add_argument("--variant", help="serve this variant (default: the version's chosen one)")
    p.add_argument("--requests", type=int, default=600, help="requests per concurrency level")
    p.add_argument("--concurrency", type=ints, default=[1, 8, 32, 64])
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--limit-batches", type=ints, default=[1, 8, 32, 64])
    p.add_argument("--forward-batches", type=ints, default=[4, 8, 32])
    p.add_argument("--search-batch-sizes", type=ints, default=[32])
    p.add_argument("--search-requests", type=int, default=400)
    p.add_argument("--search-concurrency", type=int, default=32)
    p.add_argument("--config", help='skip the search: JSON such as \'{"torch_threads": 2, '
                   '"workers": 1, "max_batch_size": 32}\'')
    p.add_argument("--loadgen", choices=["wrk", "python"], default=None,
                   help="load generator: wrk (C; default when installed) or the Python one "
                        "(bentos.loadgen, httpx)")
    p.add_argument("--duration-s", type=float, default=15.0, help="seconds per wrk load")
    p.add_argument("--max-latency-ms", type=int, default=5000)
    p.add_argument("--max-concurrency", type=int, default=128)
    p.add_argument("--budget-s", type=float, default=120.0, help="time cap per load run")
    p.add_argument("--workdir", help="keep server logs (and BENTOML_HOME if unset) here")
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.loadgen is None:
        from benchmarks.wrk_load import available

        args.loadgen = "wrk" if available() else "python"
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    if args.workdir:
        os.environ.setdefault("BENTOML_HOME", str(Path(args.workdir) / "bentoml"))
    report = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"serving-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", "utf-8")
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    print("\n" + table(report) + f"\n\nwrote {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
