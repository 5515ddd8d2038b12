"""Image classifier benchmark: the digits CNN's variants side by side, and the bento served.

    .venv/bin/python benchmarks/images.py          # trains the digits champion in a temp folder
    .venv/bin/python benchmarks/images.py --model-uri models:/digits-cnn@champion  # from
                                                    # MLFLOW_TRACKING_URI's registry instead

Sections (one process, all cores, everything on 127.0.0.1 and bounded):
1. champion: ``maas run pipelines/digits.yaml`` (``--pipeline``) in a temporary folder with its
   own MLflow store (bento build off: section 3 builds it), or the model of ``--model-uri``.
2. variants: fp32 torch, ONNX and ONNX int8 (static QDQ) built from the champion by the family's
   own compressor, measured by the pipeline's own code (``pipelines.compression``,
   ``pipelines.variant_speed``): images/s in model calls of 32 on the test images, ``--rounds``
   interleaved rounds (median, min-max), test accuracy, agreement with fp32. Beside them (not a
   variant) ``fp32 [1 thread]``: the same torch model on one intra-op thread.
3. served: the bento of the champion's chosen variant (``bentos.build_bento`` with the pipeline
   file's ``bento:`` settings), its in-process limit (the bento's own model file and runtime, all
   cores: model only, and PNG decode + model, at batch 32, interleaved rounds), then
   ``bentoml serve`` driven by ``bentos.loadgen`` with multipart PNG uploads (field ``images``;
   one load per ``--images-per-request`` size, default 1 and 8 test PNGs) at ``--concurrency``
   for ``--requests`` requests (capped at ``--budget-s``): images/s against the limits, p50/p99,
   statuses, and CPU seconds of the server (process tree) and of this process (the load
   generator) beside the wall time.

Prints a table and writes ``benchmarks/results/images-<UTC time>.json`` with the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
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
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))  # run as a script from a checkout
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
os.environ.setdefault("TQDM_DISABLE", "1")

from benchmarks.serving_drive import tree_cpu_s  # noqa: E402
from bentos.runtimes import cpu_cores as cores  # noqa: E402

VARIANTS = ("fp32", "onnx", "onnx-int8")
ONE_THREAD = "fp32 [1 thread]"  # not a variant: fp32 on one torch thread
BATCH = 32


# -- 1: champion -------------------------------------------------------------------------------
def champion(args: argparse.Namespace, work: Path):
    """(pipeline config, model URI, training seconds): the pipeline run in ``work``, or
    ``--model-uri`` in MLFLOW_TRACKING_URI's registry."""
    from pipelines.config import PipelineConfig

    overrides: dict[str, Any] = {"compression.speed_rounds": args.rounds}
    if args.model_uri:
        return PipelineConfig.load(args.pipeline, overrides), args.model_uri, None
    from pipelines.run import run_pipeline

    overrides.update({"tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "bento.enabled": False})
    cfg = PipelineConfig.load(args.pipeline, overrides)
    t0 = time.perf_counter()
    result = run_pipeline(cfg)
    if result.champion_version is None:
        raise SystemExit(f"the run registered no champion: {result}")
    return cfg, f"models:/{cfg.registry.model_name}@champion", time.perf_counter() - t0


# -- 2: variants side by side ------------------------------------------------------------------
def variants(cfg, uri: str, work: Path) -> dict[str, Any]:
    """The three variants of the champion measured side by side (the pipeline's measurement)."""
    from pipelines import compression as comp
    from pipelines.data import load_data, split_data
    from pipelines.families import load_family

    family = load_family(cfg)
    data = split_data(load_data(cfg.data, family), cfg.data)
    model = family.load_logged(uri)
    truth, names = data.names(data.test), list(data.id2label.values())
    builder = family.compressor(model, data, work / "variants")
    built = {n: comp.try_build(builder, n) for n in VARIANTS}
    if not built["fp32"].error:  # beside it: the same model on one torch thread
        one = built[ONE_THREAD] = comp.try_build(builder, "fp32")
        one.name, one.clf = ONE_THREAD, OneThread(one.clf)
    out = comp.measure_and_choose(cfg, data, built, lambda p: family.metrics(
        truth, p, model, names, data=data).metrics, builder.threads, family)
    table = {}
    for n, v in out.variants.items():
        if v.error:
            table[n] = {"error": v.error}
            continue
        f, ref = v.figures, out.variants["fp32"].figures
        table[n] = {"runtime": v.runtime, "size_mb": round(v.size_mb, 3), "params": v.params,
                    "images_per_s_b32": round(f["texts_per_s"], 1),
                    "images_per_s_rounds": f["texts_per_s_rounds"],
                    "forward_batch_size": f["forward_batch_size"],
                    "speedup_vs_fp32": round(f["texts_per_s"] / ref["texts_per_s"], 2),
                    "p50_ms_b1": round(f["p50_ms_b1"], 3), "accuracy": round(f["accuracy"], 4),
                    "f1_macro": round(f["f1_macro"], 4),
                    "agreement_with_fp32": round(f["agreement_with_fp32"], 4),
                    "settings": {k: str(val) for k, val in v.settings.items()}}
    return {"threads": builder.threads, "test_images": len(data.test), "table": table}


class OneThread:
    """A torch classifier run on one intra-op thread whatever the process-wide count (a small
    CNN's batch of 32 is too little work to split; on a busy machine the second thread mostly
    waits for a core)."""

    runtime = "torch"

    def __init__(self, clf: Any) -> None:
        self.clf = clf

    def predict_proba(self, inputs: list[Any]) -> Any:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.clf.predict_proba(inputs)
        finally:
            torch.set_num_threads(before)


# -- 3: served ---------------------------------------------------------------------------------
def test_pngs(cfg, n: int) -> list[tuple[str, bytes]]:
    """Up to ``n`` test images as (file name, PNG bytes), the classes interleaved."""
    from pipelines.families import load_family

    rows = load_family(cfg).read(cfg.data.test_path, "test_path").sample(frac=1.0,
                                                                          random_state=0)
    return [(Path(p).name, Path(p).read_bytes()) for p in rows.path[:n]]


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body (field ``images`` repeated), encoded once by httpx."""
    import httpx

    req = httpx.Request("POST", "http://127.0.0.1/classify",
                        files=[("images", (name, data, "image/png")) for name, data in files])
    return req.read(), req.headers["content-type"]


def limit(built, pngs: list[tuple[str, bytes]], rounds: int) -> dict[str, Any]:
    """The bento's own model file in its runtime, all cores, calls of 32 images: model only
    (decoded arrays) and PNG decode + model, ``rounds`` interleaved rounds each."""
    import bentoml
    import numpy as np

    from bentos.image_classifier import maas_images, maas_nets, maas_runtime

    path = bentoml.models.get(built.model_tag).path
    meta = maas_runtime.read_meta(path)
    rt = maas_runtime.load_runtime(path, maas_nets, built.settings, cores())
    channels, size = int(meta["channels"]), int(meta["image_size"])

    def decode(batch):
        return np.stack([maas_images.to_array(maas_images.decode(data, name).image, channels,
                                              size) for name, data in batch])

    calls = [pngs[i:i + BATCH] for i in range(0, len(pngs) - BATCH + 1, BATCH)]
    arrays = [decode(c) for c in calls]
    rt.probabilities(arrays[0])  # warm-up
    rates: dict[str, list[float]] = {"model": [], "decode+model": []}
    cpu = dict.fromkeys(rates, 0.0)
    for _ in range(rounds):
        for key, run in (("model", lambda: [rt.probabilities(a) for a in arrays]),
                         ("decode+model", lambda: [rt.probabilities(decode(c)) for c in calls])):
            c0, t0 = time.process_time(), time.perf_counter()
            run()
            rates[key].append(len(calls) * BATCH / (time.perf_counter() - t0))
            cpu[key] += time.process_time() - c0
    n = rounds * len(calls) * BATCH
    out = {k: {**spread(v), "cpu_ms_per_image": round(1000 * cpu[k] / n, 4)}
           for k, v in rates.items()}
    return {"runtime": rt.info, "images_per_call": BATCH, "calls_per_round": len(calls), **out}


def spread(values: list[float]) -> dict[str, Any]:
    return {"images_per_s": round(statistics.median(values), 1),
            "min": round(min(values), 1), "max": round(max(values), 1),
            "rounds": [round(v, 1) for v in values]}


def load(url: str, payloads, requests: int, concurrency: int, budget_s: float):
    from bentos.loadgen import run_load

    return asyncio.run(run_load(f"{url}/classify", payloads, requests=requests,
                                concurrency=concurrency, time_budget_s=budget_s,
                                request_timeout_s=60, encode=multipart))


def served(built, pngs, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """``bentoml serve`` of the bento, warmed up, then one bounded load at ``--concurrency``
    per ``--images-per-request`` size."""
    from bentos.server import serve_bento

    out = []
    with serve_bento(built.bento_tag, log_path=work / "server.log") as srv:
        for k in args.images_per_request:
            payloads = [pngs[i:i + k] for i in range(0, len(pngs) - k + 1, k)]
            load(srv.url, payloads, 8 * args.concurrency, args.concurrency, 60)  # not measured
            server0, t0 = tree_cpu_s(srv.process.pid), time.perf_counter()
            r = load(srv.url, payloads, args.requests, args.concurrency, args.budget_s)
            server_cpu, wall = tree_cpu_s(srv.process.pid) - server0, time.perf_counter() - t0
            out.append(summary(r, k, server_cpu, wall))
            print(f"  {k} image(s)/request: {out[-1]['images_per_s']} images/s, p50 "
                  f"{out[-1]['p50_ms']} ms, p99 {out[-1]['p99_ms']} ms, {out[-1]['statuses']}",
                  flush=True)
    return out


def summary(r, k: int, server_cpu: float, wall: float) -> dict[str, Any]:
    s = r.summary()
    return {"images_per_request": k, "concurrency": r.concurrency,
            "requests": r.requests, "ok": r.ok, "statuses": s["statuses"],
            "server_errors": r.server_errors, "transport_errors": r.transport_errors,
            "malformed": r.malformed, "not_sent": r.not_sent, "wall_s": s["wall_s"],
            "images_per_s": round(r.texts_per_s, 1), "requests_per_s": s["throughput_rps"],
            "p50_ms": s["p50_ms"], "p90_ms": s["p90_ms"], "p99_ms": s["p99_ms"],
            "server_cpu_s": round(server_cpu, 2), "server_cores": round(server_cpu / wall, 2),
            "server_cpu_ms_per_image": round(1000 * server_cpu / r.texts_ok, 3)
            if r.texts_ok else None,
            "loadgen_cpu_s": s["loadgen_cpu_s"], "loadgen_cores": s["loadgen_cores"],
            "loadgen_cpu_ms_per_image": round(1000 * r.cpu_s / r.texts_ok, 3)
            if r.texts_ok else None,
            "loadavg_1m_after": os.getloadavg()[0], "error_samples": s["error_samples"]}


def serve_section(cfg, uri: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from bentos import build_bento

    built = build_bento(uri, cfg.bento.settings())
    pngs = test_pngs(cfg, args.limit_images)
    lim = limit(built, pngs, args.rounds)
    gc.collect()  # the limit's session goes before the server starts
    return {"bento": {"tag": built.bento_tag, "variant": built.variant,
                      "runtime": built.runtime, "settings": built.settings},
            "limit": lim, "served": served(built, pngs, args, work)}


# -- main --------------------------------------------------------------------------------------
def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import onnxruntime
    import torch

    from bentos.machine import describe

    report: dict[str, Any] = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": cores(), "platform": platform.platform(), "cpu": describe(),
                    "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                    "python": platform.python_version(), "loadavg_start": os.getloadavg()},
        "args": vars(args)}
    t_all = time.perf_counter()
    print("1. champion ...", flush=True)
    cfg, uri, train_s = champion(args, work)
    report.update(model_uri=uri, pipeline=str(cfg.source_file),
                  train_s=round(train_s, 1) if train_s else None)
    print(f"2. variants of {uri}, {args.rounds} interleaved rounds ...", flush=True)
    report["variants"] = variants(cfg, uri, work)
    print("3. bento: in-process limit, then bentoml serve ...", flush=True)
    report.update(serve_section(cfg, uri, args, work))
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["wall_s"] = round(time.perf_counter() - t_all, 1)
    report["verdict"] = verdict(report)
    return report


def verdict(report: dict[str, Any]) -> dict[str, Any]:
    """Served images/s (the first load: ``--images-per-request``'s first size) over the
    in-process limits."""
    s, lim, var = report["served"][0], report["limit"], report["variants"]["table"]
    same = var.get(report["bento"]["variant"], {}).get("images_per_s_b32")
    n = report["machine"]["cpus"]
    left = max(0.0, n - s["loadgen_cores"]) / n  # the load generator shares the cores
    full = lim["decode+model"]["images_per_s"]
    return {"images_per_request": s["images_per_request"], "concurrency": s["concurrency"],
            "served_over_decode_plus_model_limit_on_cores_left_by_loadgen":
                round(s["images_per_s"] / (full * left), 3) if left else None,
            "cpu_ms_per_image": {"in_process_decode_plus_model":
                                 lim["decode+model"]["cpu_ms_per_image"],
                                 "server": s["server_cpu_ms_per_image"],
                                 "loadgen": s["loadgen_cpu_ms_per_image"]},
            "served_images_per_s": s["images_per_s"],
            "variant_limit_images_per_s": same,
            "served_over_variant_limit": round(s["images_per_s"] / same, 3) if same else None,
            "served_over_bento_model_limit":
                round(s["images_per_s"] / lim["model"]["images_per_s"], 3),
            "served_over_decode_plus_model_limit":
                round(s["images_per_s"] / lim["decode+model"]["images_per_s"], 3),
            "served_5xx": sum(r["server_errors"] for r in report["served"])}


def table(report: dict[str, Any]) -> str:
    m, v = report["machine"], report["variants"]
    feats = [k for k, on in (m["cpu"].get("features") or {}).items() if on]
    lines = [f"model {report['model_uri']} ({v['test_images']} test images); CPU "
             f"{m['cpu']['cpu_model']} [{', '.join(feats)}], {m['cpus']} cores, "
             f"{v['threads']} threads; load average start/end {m['loadavg_start'][0]:.2f}/"
             f"{m['loadavg_end'][0]:.2f}", "",
             "| variant | runtime | images/s b32 (median) | min-max | x fp32 | accuracy "
             "| agree fp32 | MB |", "|---|---|---|---|---|---|---|---|"]
    for n, r in v["table"].items():
        if "error" in r:
            lines.append(f"| {n} | skipped: {r['error'][:80]} |")
            continue
        rs = r["images_per_s_rounds"]
        lines.append(f"| {n} | {r['runtime']} | {r['images_per_s_b32']:.0f} | {min(rs):.0f}-"
                     f"{max(rs):.0f} | {r['speedup_vs_fp32']:.2f} | {r['accuracy']:.4f} | "
                     f"{r['agreement_with_fp32']:.4f} | {r['size_mb']:.3f} |")
    b, lim = report["bento"], report["limit"]
    lines += ["", f"bento {b['tag']} serves {b['variant']} ({b['runtime']}); in-process limit "
              f"(its model file, {lim['runtime']['threads']} threads, batch {BATCH}): model "
              f"{_fmt(lim['model'])}, PNG decode + model {_fmt(lim['decode+model'])} images/s",
              "", "| PNGs/request | conc. | ok/sent | wall s | images/s | p50 ms | p99 ms "
              "| statuses | server CPU s (cores) | loadgen CPU s (cores) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for s in report["served"]:
        lines.append(f"| {s['images_per_request']} | {s['concurrency']} | {s['ok']}/"
                     f"{s['requests'] - s['not_sent']} | {s['wall_s']:.1f} | "
                     f"{s['images_per_s']:.0f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | "
                     f"{s['statuses']} | {s['server_cpu_s']} ({s['server_cores']}) | "
                     f"{s['loadgen_cpu_s']:.2f} ({s['loadgen_cores']}) |")
    vd = report["verdict"]
    lines.append(f"\nserved ({vd['images_per_request']} PNG/request, c={vd['concurrency']}) / "
                 f"in-process limit: {vd['served_over_variant_limit']} (variant, model only, "
                 f"section 2), {vd['served_over_bento_model_limit']} (bento model only), "
                 f"{vd['served_over_decode_plus_model_limit']} (bento PNG decode + model; "
                 f"{vd['served_over_decode_plus_model_limit_on_cores_left_by_loadgen']} on the "
                 f"cores the load generator leaves); 5xx: {vd['served_5xx']}\nCPU ms per image: "
                 + ", ".join(f"{k} {v}" for k, v in vd["cpu_ms_per_image"].items()))
    return "\n".join(lines)


def _fmt(r: dict[str, Any]) -> str:
    return f"{r['images_per_s']:.0f} ({r['min']:.0f}-{r['max']:.0f})"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", default=str(REPO / "pipelines" / "digits.yaml"))
    p.add_argument("--model-uri", help="models:/NAME@ALIAS in MLFLOW_TRACKING_URI's registry "
                   "(default: train the pipeline's champion in a temporary store)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--images-per-request", type=lambda t: [int(x) for x in t.split(",")],
                   default=[1, 8], help="PNGs per request, one load each (comma list)")
    p.add_argument("--requests", type=int, default=2000, help="requests in the served load")
    p.add_argument("--budget-s", type=float, default=30.0, help="time cap of the served load")
    p.add_argument("--limit-images", type=int, default=320, help="test PNGs for the limit and "
                   "the load (cycled)")
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="maas-images-bench-") as tmp:
        work = Path(tmp)
        os.environ["BENTOML_HOME"] = str(work / "bentoml")  # a bento store of its own
        report = run(args, work)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"images-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", "utf-8")
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    print("\n" + table(report) + f"\n\nwrote {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
