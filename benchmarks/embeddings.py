"""Text-embedder benchmark (issue 19): embeddings/s of a registered embedder's chosen variant vs
sentence-transformers' ``encode`` of the same checkpoint (the version's fp32 encoder folder,
mean pooling), side by side in interleaved rounds on all cores, and the bento served over HTTP
vs the same variant in-process.

  python benchmarks/embeddings.py --model models:/sst2-embedder@champion \
      [--tracking-uri sqlite:///mlflow.db] [--bento TAG --bentoml-home DIR] [--texts 512]

Texts: the SST-2 test sentences (data/sst2/test.tsv). Prints a table and writes
``benchmarks/results/embeddings-<UTC time>.json`` with the machine (bentos/machine.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BATCH = 32


def texts(n: int) -> list[str]:
    import pandas as pd

    rows = pd.read_csv(REPO / "data" / "sst2" / "test.tsv", sep="\t").sentence.tolist()
    return [str(t) for t in (rows * (n // len(rows) + 1))[:n]]


def chosen_variant(model_uri: str, work: Path) -> tuple[str, Path, Path]:
    """(variant name, its runtime folder, the fp32 encoder folder) of the version."""
    import mlflow
    from mlflow import MlflowClient

    from bentos.build import _resolve_version, parse_model_uri

    name, alias, version = parse_model_uri(model_uri)
    mv = _resolve_version(name, alias, version)
    tags = MlflowClient().get_model_version(name, mv.version).tags
    variant = tags.get("maas.variant", "fp32")
    table = json.loads(tags.get("maas.variants", "{}"))
    fp32 = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{mv.version}",
                                                    dst_path=str(work / "fp32")))
    encoder = next(fp32.rglob("maas_embedder.json")).parent
    if variant == "fp32":
        return variant, fp32, encoder
    got = Path(mlflow.artifacts.download_artifacts(table[variant]["model_uri"],
                                                   dst_path=str(work / variant)))
    folder = work / f"{variant}-runtime"
    folder.mkdir()
    shutil.copy2(got / "model.onnx", folder / "model.onnx")
    for f in (got / "extra_files").iterdir():
        shutil.copy2(f, folder / f.name)
    return variant, folder, encoder


def interleaved(fns: dict[str, Any], data: list[str], rounds: int) -> dict[str, list[float]]:
    """embeddings/s of each function over ``data`` in calls of 32, rounds interleaved."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn(data[:BATCH])  # warm
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for i in range(0, len(data), BATCH):
                fn(data[i:i + BATCH])
            out[name].append(len(data) / (time.perf_counter() - t0))
    return out


def served(bento: str, home: str | None, data: list[str], concurrency: int) -> dict[str, Any]:
    import httpx

    from bentos.server import serve_bento

    batches = [data[i:i + BATCH] for i in range(0, len(data), BATCH)]
    with serve_bento(bento, bentoml_home=home) as running, httpx.Client(timeout=120) as client:
        url = f"{running.url}/embed"

        def call(batch: list[str]) -> int:
            r = client.post(url, json={"texts": batch, "encoding": "base64"})
            r.raise_for_status()
            return len(r.json()["embeddings"])

        call(batches[0])
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(concurrency) as pool:
            n = sum(pool.map(call, batches))
        return {"embeddings_per_s": n / (time.perf_counter() - t0), "concurrency": concurrency,
                "request_texts": BATCH, "encoding": "base64"}


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    from sentence_transformers import SentenceTransformer

    from bentos.machine import describe
    from bentos.text_embedder.maas_runtime import load_runtime

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    variant, folder, encoder = chosen_variant(args.model, work)
    runtime = "onnxruntime" if (folder / "model.onnx").is_file() else "torch"
    rt = load_runtime({"runtime": runtime}, folder, {}, cores)  # the bento's pass size
    fp32 = load_runtime({"runtime": "torch"}, encoder, {}, cores)
    st = SentenceTransformer(str(encoder), device="cpu")
    data = texts(args.texts)
    ours, ref = rt.embed(data[:64]), st.encode(data[:64], normalize_embeddings=True)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    speeds = interleaved({f"maas {variant} (chosen)": rt.embed, "maas fp32 (torch)": fp32.embed,
                          "sentence-transformers encode": lambda t: st.encode(
                              t, batch_size=BATCH, normalize_embeddings=True)},
                         data, args.rounds)
    report: dict[str, Any] = {
        "model": args.model, "variant": variant, "runtime": runtime, "texts": len(data),
        "rounds": args.rounds, "threads": cores,
        "cosine_vs_sentence_transformers": {"min": float(cos.min()), "mean": float(cos.mean())},
        "in_process": {k: {"median": statistics.median(v), "rounds": [round(x, 1) for x in v]}
                       for k, v in speeds.items()},
        "machine": {"cpus": cores, "cpu": describe(), "loadavg": os.getloadavg()},
    }
    if args.bento:
        report["served"] = served(args.bento, args.bentoml_home, data, args.concurrency)
    return report


def table(r: dict[str, Any]) -> str:
    lines = [f"{'what':<38} {'embeddings/s':>13}"]
    lines += [f"{k:<38} {v['median']:>13.1f}" for k, v in r["in_process"].items()]
    if "served" in r:
        s = r["served"]
        lines.append(f"{'served /embed (c=' + str(s['concurrency']) + ', 32/request)':<38} "
                     f"{s['embeddings_per_s']:>13.1f}")
    c = r["cosine_vs_sentence_transformers"]
    lines.append(f"cosine vs sentence-transformers: min {c['min']:.6f}, mean {c['mean']:.6f}; "
                 f"{r['threads']} threads, {r['rounds']} interleaved rounds of {r['texts']} texts")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--bento", default=None, help="a bento tag to serve and load")
    p.add_argument("--bentoml-home", default=None)
    p.add_argument("--texts", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=4)
    args = p.parse_args(argv)
    if args.tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(args.tracking_uri)
    with tempfile.TemporaryDirectory(prefix="maas-embed-bench-") as tmp:
        report = run(args, Path(tmp))
    print(table(report))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"embeddings-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n", "utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
