"""Serving benchmark: ``bentoml serve`` of the champion's chosen variant against the machine limit.

    .venv/bin/python benchmarks/serving.py          # models:/<sentiment.yaml model>@champion,
                                                    # tracking store sqlite:///mlflow.db (cwd)
    .venv/bin/python benchmarks/serving.py --model-uri models:/sst2-sentiment@champion \\
        --variant onnx-int8 --requests 600 --concurrency 1,8,32,64 --rounds 3

Sections (all on 127.0.0.1; every load is bounded in requests and time):
1. search: a few served configurations (runtime threads, workers, ``max_batch_size``), each
   built, started and driven at concurrency ``--search-concurrency`` for ``--search-requests``
   requests; the best one (texts/s, with zero 5xx and p99 <= 3x p50) is kept. Nothing about
   threads, workers or batching is fixed in advance.
2. the kept configuration at each ``--concurrency`` level: texts/s, p50/p99, statuses, the mean
   model batch (texts per model call, from ``maas_classify_batch_texts``), and the CPU the
   server and the load generator each used (they share the machine's cores).
3. side by side, ``--rounds`` interleaved rounds of (a) the machine limit: the bento's own
   service in this process on all cores, measured exactly as the pipeline's variant table and
   ``benchmarks/compression.py`` measure a variant (``pipelines.variant_speed.timed``: the first
   320 SST-2 test texts in calls of 32, the bento's forward passes, texts/s and this process's
   CPU ms per text), and (b) the served rate at concurrency 32 with the server's own CPU
   (its process tree's counters) per text. The verdict takes medians and states the spread:
   ``served_over_machine_limit`` and ``cpu_ratio`` (server / in-process CPU ms per text), beside
   the figure the pipeline recorded for the same variant (``maas.variants``).

The load generator: ``wrk`` when installed, else ``bentos.loadgen`` (aiohttp, one keep-alive
connection per concurrent client, bodies encoded once); ``--texts-per-request`` texts per
request, default 1. Every load returns once the server is idle (``wrk`` stops with requests
in flight), so the next measurement starts clean. Writes
``benchmarks/results/serving-<UTC time>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
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

from benchmarks.serving_drive import drive  # noqa: E402
from bentos.runtimes import cpu_cores as cores  # noqa: E402


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


# -- the machine limit, measured as the pipeline measures a variant --------------------------
class InProcess:
    """The bento's service in this process with every core, timed as the pipeline's variant
    table times a variant (``pipelines.variant_speed``)."""

    def __init__(self, bento_tag: str, texts: list[str]) -> None:
        from bentos.testing import load_service
        from pipelines.variant_speed import SPEED_TEXTS

        _, self.svc = load_service(bento_tag, torch_threads=cores())
        self.runtime = self.svc.info["runtime"]
        self.texts = texts[:SPEED_TEXTS]

    def predict_proba(self, texts: list[str]):
        import numpy as np

        return np.asarray([list(p["probabilities"].values())
                           for p in self.svc.predict_texts(texts)])

    def round(self) -> dict[str, float]:
        """One timed round: texts/s and CPU ms per text (all threads of this process)."""
        from pipelines.variant_speed import BATCH, timed

        rate, cpu_ms = timed(self, self.texts, forward=BATCH)  # one call = the service's own
        return {"texts_per_s": round(rate, 1), "cpu_ms_per_text": round(cpu_ms, 3)}

    def info(self) -> dict[str, Any]:
        return {k: self.svc.info.get(k) for k in (
            "variant", "runtime", "dtype", "providers", "threads", "forward_batch_size",
            "variant_accuracy", "variant_accuracy_drop", "model_name", "model_version")}


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


def candidates(n_cores: int, sizes: list[int]) -> list[dict[str, Any]]:
    """Served configurations to try: every core for the model vs one left to the event loop,
    one worker vs one per core (each with one runtime thread, or with every core: the runtimes
    do not spin, so one worker's model call can use the cores the other spends on HTTP), and
    each batch cap; forward passes as the bento has them (the variant's measured best)."""
    out = []
    for threads in sorted({n_cores, max(1, n_cores - 1)}, reverse=True):
        for size in sizes:
            out.append({"torch_threads": threads, "workers": 1, "max_batch_size": size})
    if n_cores > 1:
        for threads in (1, n_cores):
            out.append({"torch_threads": threads, "workers": n_cores,
                        "max_batch_size": sizes[0]})
    return out


def search(model_uri: str, args, workdir: Path, payloads) -> dict[str, Any]:
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

    for config in candidates(cores(), args.search_batch_sizes):
        attempt(config)
    attempt({**best()["config"], "access_log": False})
    return {"tried": tried, "best": best()["config"]}


def side_by_side(limit: InProcess, srv, payloads, args) -> list[dict[str, Any]]:
    """``--rounds`` interleaved rounds: the in-process limit, then the served rate at c=32."""
    rounds = []
    for r in range(args.rounds):
        lim = limit.round()  # drive() returned with the server idle
        served_r = drive(srv, payloads, args.requests, 32, args.budget_s, args.loadgen,
                         args.duration_s)
        rounds.append({"limit": lim, "served": served_r})
        print(f"  round {r + 1}: in-process {lim['texts_per_s']} texts/s "
              f"({lim['cpu_ms_per_text']} CPU ms/text), served {served_r['texts_per_s']} "
              f"({served_r['server_cpu_ms_per_text']} server CPU ms/text)", flush=True)
    return rounds


def recorded_figures(info: dict[str, Any], variant: str | None) -> dict[str, Any]:
    """What the pipeline's variant table recorded for ``variant`` on the served version."""
    from mlflow import MlflowClient

    tags = MlflowClient().get_model_version(info["model_name"], info["model_version"]).tags
    table = json.loads(tags.get("maas.variants") or "{}")
    row = table.get(variant or tags.get("maas.variant") or "fp32") or {}
    return {k: row.get(k) for k in ("texts_per_s", "texts_per_s_rounds", "cpu_ms_per_text",
                                    "machine")}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime

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
                    "onnxruntime": onnxruntime.__version__,
                    "python": platform.python_version(),
                    "loadavg_start": os.getloadavg(), **_cpu()},
        "args": vars(args), "model_uri": model_uri,
        "tracking_uri": os.environ.get("MLFLOW_TRACKING_URI", ""),
    }
    t_all = time.perf_counter()
    built = build_bento(model_uri, BentoSettings(variant=args.variant))
    limit = InProcess(built.bento_tag, texts)
    report["variant"] = limit.info()
    report["pipeline_recorded"] = recorded_figures(report["variant"], built.variant)
    if args.config:
        report["search"] = {"tried": [], "best": json.loads(args.config)}
    else:
        print("1. choosing the served configuration ...", flush=True)
        report["search"] = search(model_uri, args, workdir, payloads)
    best = report["search"]["best"]
    print(f"2. bentoml serve with {best} ...", flush=True)
    with served(model_uri, best, args, workdir, "final") as (srv, built):
        report["bento"] = {"tag": built.bento_tag, "settings": built.settings}
        warm_up(srv, payloads)
        report["served"] = [drive(srv, payloads, args.requests, c, args.budget_s,
                                  args.loadgen, args.duration_s) for c in args.concurrency]
        print(f"3. side by side, {args.rounds} interleaved rounds ...", flush=True)
        report["side_by_side"] = side_by_side(limit, srv, payloads, args)
    report["wall_s"] = round(time.perf_counter() - t_all, 1)
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["verdict"] = verdict(report)
    return report


def _spread(values: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "rounds": values}


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    rounds = report["side_by_side"]
    limit = _spread([r["limit"]["texts_per_s"] for r in rounds])
    served = _spread([r["served"]["texts_per_s"] for r in rounds])
    limit_cpu = _spread([r["limit"]["cpu_ms_per_text"] for r in rounds])
    server_cpu = _spread([r["served"]["server_cpu_ms_per_text"] or 0.0 for r in rounds])
    ratios = [round(r["served"]["texts_per_s"] / r["limit"]["texts_per_s"], 3) for r in rounds]
    n = report["machine"]["cpus"]
    loadgen_cores = statistics.median(r["served"]["loadgen_cores"] for r in rounds)
    out: dict[str, Any] = {
        "concurrency": 32, "rounds": len(rounds),
        "served_texts_per_s": served, "machine_limit_texts_per_s": limit,
        "served_over_machine_limit": round(served["median"] / limit["median"], 3),
        "served_over_machine_limit_rounds": ratios,
        # the load generator shares the cores: the limit on what it leaves to the server
        "served_over_limit_on_cores_left_by_loadgen": round(
            served["median"] / (limit["median"] * max(0.01, n - loadgen_cores) / n), 3),
        "loadgen_cores": loadgen_cores,
        "limit_cpu_ms_per_text": limit_cpu, "server_cpu_ms_per_text": server_cpu,
        # what serving costs beyond the model, from the processes' own counters
        "cpu_ratio": round(server_cpu["median"] / limit_cpu["median"], 3),
        "loadgen_cpu_ms_per_text": statistics.median(
            r["served"]["loadgen_cpu_ms_per_text"] or 0.0 for r in rounds),
        "mean_batch": statistics.median(r["served"]["mean_batch"] or 0.0 for r in rounds),
        "pipeline_recorded_texts_per_s": report["pipeline_recorded"].get("texts_per_s"),
        "served_5xx": sum(r["server_errors"] for r in report["served"])
        + sum(r["served"]["server_errors"] for r in rounds),
        "p99_over_p50": {r["concurrency"]: r["p99_over_p50"] for r in report["served"]},
    }
    at32 = out["p99_over_p50"].get(32) or max(r["served"]["p99_over_p50"] or 99 for r in rounds)
    out["targets"] = {
        "served >= 0.8 x machine limit at c=32": out["served_over_machine_limit"] >= 0.8,
        "cpu_ratio <= 1.25": out["cpu_ratio"] <= 1.25,
        "p99 <= 3 x p50 at c=32": at32 <= 3,
        "zero 5xx": out["served_5xx"] == 0,
    }
    return out


def table(report: dict[str, Any]) -> str:
    m, v, vd = report["machine"], report["variant"], report["verdict"]
    rec = report["pipeline_recorded"]
    lines = [(f"model: {report['model_uri']} v{v['model_version']}, variant {v['variant']} "
             f"({v['runtime']}, {v['dtype']}, {v['providers'] or ''}), forward passes of "
             f"{v['forward_batch_size']}"),
             (f"machine: {m['cpu']['cpu_model']}, {m['cpus']} CPUs, load average start/end "
              f"{m['loadavg_start'][0]:.1f}/{m['loadavg_end'][0]:.1f}"), ""]
    header = ("| config (threads, workers, max batch) | conc. | texts/s | p50 ms "
              "| p99 ms | p99/p50 | mean batch | server cores | loadgen cores | statuses |")
    lines += [header, "|" + "---|" * 10]
    rows = [(t["config"], t) for t in report["search"]["tried"]]
    rows += [(report["search"]["best"], r) for r in report["served"]]
    rows += [(report["search"]["best"], r["served"]) for r in report["side_by_side"]]
    for config, r in rows:
        cfg = (f"t{config.get('torch_threads')} w{config.get('workers')} "
               f"b{config.get('max_batch_size')}"
               + (" no-access-log" if config.get("access_log") is False else ""))
        lines.append(f"| {cfg} | {r['concurrency']} | {r['texts_per_s']:.1f} | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['p99_over_p50']} | "
                     f"{r['mean_batch']} | {r['server_cores']} | {r['loadgen_cores']} | "
                     f"{', '.join(f'{k}: {n}' for k, n in r['statuses'].items())} |")

    def fmt(d: dict[str, Any]) -> str:
        return f"{d['median']} (rounds {d['min']}-{d['max']})"

    lines += ["", f"side by side at c=32, {vd['rounds']} interleaved rounds (median, spread):",
              f"  in-process limit texts/s {fmt(vd['machine_limit_texts_per_s'])}; the "
              f"pipeline's variant table recorded {rec.get('texts_per_s')} on "
              f"{(rec.get('machine') or {}).get('cpu_model', 'an unrecorded CPU')}",
              f"  served texts/s {fmt(vd['served_texts_per_s'])}: served / limit "
              f"{vd['served_over_machine_limit']} (rounds {vd['served_over_machine_limit_rounds']}"
              f"; on the cores the load generator leaves: "
              f"{vd['served_over_limit_on_cores_left_by_loadgen']})",
              f"  CPU ms per text: in-process {fmt(vd['limit_cpu_ms_per_text'])}, server "
              f"{fmt(vd['server_cpu_ms_per_text'])}, load generator "
              f"{vd['loadgen_cpu_ms_per_text']}: cpu_ratio {vd['cpu_ratio']}; 5xx "
              f"{vd['served_5xx']}"]
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
    p.add_argument("--rounds", type=int, default=3, help="side-by-side rounds (section 3)")
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
