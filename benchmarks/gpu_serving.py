"""GPU serving benchmark: ``bentoml serve`` of a registered version on a CUDA card vs the model
alone, at sequence length 128 (issue 20, item 5). One prepared call on a GPU machine:

    scripts/gpu_check.sh            # installs .gpu/whl, then runs this with --out $OUT/...
    python benchmarks/gpu_serving.py --checkpoint DIR --out FILE [--quick]

Steps (everything on 127.0.0.1, every load bounded in requests and seconds):
1. the model: ``--checkpoint``'s config and tokenizer, with its weights when the folder has them,
   else a seeded random initialisation of the same architecture (the packaged MiniLM's 88 MB of
   weights do not fit the GPU machine's 64 MiB transfer beside the wheelhouse; throughput does not
   depend on weight values, and the served answers are checked against in-process ones);
2. registered in an embedded SQLite MLflow store (the transformers flavour, as the pipeline logs
   it) and built into a bento with ``bentos.build_bento`` from ``models:/gpu-bench/1`` (variant
   fp32, which the service runs in bf16 on CUDA; ``max_tokens`` 128);
3. model-only: the service's own model object, random token ids at length 128, batch
   ``--batch``: seq/s and the share of the card's dense bf16 peak (benchmarks/gpu.py's formula);
4. in-process: the bento's ``predict_texts`` (tokenise, pad, forward, softmax) on texts that
   tokenise to >= 128 tokens, batch ``--batch``: the machine limit of the service's code path;
5. served: ``bentoml serve`` with ``TOKENIZERS_PARALLELISM=true`` (HF tokenizers encodes a batch
   on all cores), ``--clients`` load-generator processes (bentos.loadgen) posting
   ``--texts-per-request`` texts each at ``--concurrency`` in flight; texts/s, statuses, p50/p99,
   for each of ``--workers`` (service worker processes on the one card).
Without CUDA, steps 1-2 run (the bento builds) and the script exits 2 saying so, unless
``--cpu-smoke`` runs every step on the CPU at small sizes (a test of the script, no figures).
Writes ``--out`` (default ``benchmarks/results/gpu-serving-<card>-<UTC>.json``), prints a table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
               "BENTOML_DO_NOT_TRACK": "True", "TRANSFORMERS_VERBOSITY": "error",
               "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "true",
               # the in-process figure tokenises on all cores, as the served worker does
               "TOKENIZERS_PARALLELISM": "true"}.items():
    os.environ.setdefault(_k, _v)

from benchmarks.gpu import forward_flops, peak_tflops  # noqa: E402

MODEL_NAME = "gpu-bench"
SEQ = 128


def make_checkpoint(src: Path, dest: Path, seed: int) -> dict[str, Any]:
    """A sequence classifier of ``src``'s architecture in ``dest``; its weights' origin."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    labels = {0: "negative", 1: "positive"}
    kw = {"num_labels": 2, "id2label": labels, "label2id": {v: k for k, v in labels.items()}}
    if any(src.glob("*.safetensors")):
        model = AutoModelForSequenceClassification.from_pretrained(src, **kw)
        origin = f"pretrained encoder from {src.name} (classifier head untrained)"
    else:
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(
            AutoConfig.from_pretrained(src, **kw))
        origin = (f"random init (seed {seed}) of {src.name}'s architecture: its weights do not "
                  "fit the GPU machine's transfer; speed does not depend on weight values")
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(src).save_pretrained(dest)
    n = sum(p.numel() for p in model.parameters())
    return {"weights": origin, "parameters": n, "layers": model.config.num_hidden_layers,
            "hidden": model.config.hidden_size}


def register_and_build(checkpoint: Path, batch: int, workers: int) -> str:
    """Register ``checkpoint`` as a new version of MODEL_NAME; a bento of it; its tag."""
    from bentos import BentoSettings, build_bento
    from bentos.testing import load_classifier, register_classifier

    model, tokenizer = load_classifier(checkpoint)
    version = register_classifier(model, tokenizer, MODEL_NAME)
    settings = BentoSettings(variant="fp32", max_batch_size=batch, max_texts=batch,
                             max_latency_ms=60000, max_tokens=SEQ, forward_batch_size=batch,
                             workers=workers, max_concurrency=512, access_log=False)
    return build_bento(f"models:/{MODEL_NAME}/{version}", settings).bento_tag


def long_texts(tokenizer, n: int) -> list[str]:
    """``n`` distinct SST-2 test sentences joined until each tokenises to >= SEQ tokens."""
    lines = (REPO / "data" / "sst2" / "test.tsv").read_text("utf-8").splitlines()[1:]
    pool = [ln.rsplit("\t", 1)[0].strip() for ln in lines if "\t" in ln]
    out, i = [], 0
    while len(out) < n:
        parts = []
        while len(tokenizer(" ".join(parts))["input_ids"]) < SEQ + 2:
            parts.append(pool[i % len(pool)])
            i += 1
        out.append(" ".join(parts))
    return out


def model_only(instance, batch: int, iters: int, compiled: bool = False) -> dict[str, Any]:
    """seq/s of the service's model object alone at length SEQ (random ids, full mask);
    ``compiled``: through ``torch.compile`` (what the service does not do, for comparison)."""
    import torch

    rt = instance.runtime
    cfg = rt.model.config
    model = torch.compile(rt.model) if compiled else rt.model
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(1000, cfg.vocab_size, (batch, SEQ), generator=g).to(rt.device)
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)

    def step():
        with torch.inference_mode():
            model(**x)
    for _ in range(max(2, iters // 5)):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    s = (time.perf_counter() - t0) / iters
    flops = forward_flops(cfg, SEQ)
    return {"batch": batch, "seq_len": SEQ, "dtype": str(rt.dtype).replace("torch.", ""),
            "compiled": compiled,
            "seq_per_s": batch / s, "tflops": flops * batch / s / 1e12}


def in_process(instance, texts: list[str], batch: int, rounds: int) -> dict[str, Any]:
    """texts/s of the bento's predict_texts (tokenise + forward + softmax), median of rounds."""
    chunks = [texts[i:i + batch] for i in range(0, len(texts) - batch + 1, batch)]
    instance.predict_texts(chunks[0])  # warm-up
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for c in chunks:
            instance.predict_texts(c)
        rates.append(len(chunks) * batch / (time.perf_counter() - t0))
    return {"batch": batch, "texts_per_s": statistics.median(rates), "rounds": rates}


def _client(args: tuple) -> dict[str, Any]:
    from bentos.loadgen import as_dict, load

    url, payloads, requests, concurrency, budget = args
    return as_dict(load(url, payloads, requests=requests, concurrency=concurrency,
                        time_budget_s=budget, request_timeout_s=60.0))


def served(bento_tag: str, texts: list[str], opts: argparse.Namespace,
           reference: list[dict]) -> dict[str, Any]:
    """``bentoml serve`` driven by ``opts.clients`` processes; texts/s and answer agreement."""
    import httpx

    from bentos.build import bentoml_home
    from bentos.server import serve_bento

    per = opts.texts_per_request
    payloads = [texts[i:i + per] for i in range(0, len(texts) - per + 1, per)]
    env = {"TOKENIZERS_PARALLELISM": "true"}
    with serve_bento(bento_tag, bentoml_home=bentoml_home(), env=env,
                     startup_timeout_s=300) as server:
        url = f"{server.url}/classify"
        resp = httpx.post(url, json={"texts": texts[:len(reference)]}, timeout=120)
        resp.raise_for_status()
        sample = resp.json()
        agree = sum(a["label"] == b["label"] for a, b in zip(sample, reference, strict=True))
        gap = max(abs(a["probabilities"][k] - b["probabilities"][k])
                  for a, b in zip(sample, reference, strict=True) for k in a["probabilities"])
        warm = (url, payloads[:4], 4 * opts.clients, opts.clients, 60.0)
        _client(warm)
        job = (url, payloads, opts.requests // opts.clients,
               max(1, opts.concurrency // opts.clients), opts.budget_s)
        t0 = time.perf_counter()
        with mp.get_context("spawn").Pool(opts.clients) as pool:
            parts = pool.map(_client, [job] * opts.clients)
        wall = time.perf_counter() - t0
    ok = sum(p["texts_ok"] for p in parts)
    statuses: dict[str, int] = {}
    for p in parts:
        for k, v in p["statuses"].items():
            statuses[str(k)] = statuses.get(str(k), 0) + v
    lat = sorted(x for p in parts for x in p.get("latencies_ms", []))
    return {"texts_per_s": ok / wall, "texts_ok": ok, "wall_s": wall, "statuses": statuses,
            "p50_ms": lat[len(lat) // 2] if lat else None,
            "p99_ms": lat[int(len(lat) * 0.99)] if lat else None,
            "clients": opts.clients, "concurrency": opts.concurrency,
            "texts_per_request": per, "labels_agree_with_in_process": f"{agree}/{len(reference)}",
            "max_score_gap": gap}


def run(opts: argparse.Namespace, cuda: bool, card: str) -> dict[str, Any]:
    from bentos.testing import load_service

    tmp = Path(tempfile.mkdtemp(prefix="maas-gpu-"))
    os.chdir(tmp)  # the SQLite store's artifacts (./mlruns) land there, not in the checkout
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
    for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):  # another store's
        os.environ.pop(name, None)
    os.environ["BENTOML_HOME"] = str(tmp / "bentoml")
    facts = make_checkpoint(opts.checkpoint, tmp / "ckpt", seed=0)
    t0 = time.perf_counter()
    tags = {w: register_and_build(tmp / "ckpt", opts.batch, w) for w in opts.workers}
    out: dict[str, Any] = {"model": facts, "build_s": time.perf_counter() - t0,
                           "bento_tags": {str(k): v for k, v in tags.items()}}
    if not cuda and not opts.cpu_smoke:
        return out
    _, instance = load_service(tags[opts.workers[0]])
    texts = long_texts(instance.runtime.tokenizer, opts.texts)
    out["model_only"] = model_only(instance, opts.batch, opts.iters)
    peak, source = peak_tflops(card, opts.peak_tflops)
    out["model_only"].update(peak_tflops=peak, peak_source=source,
                             share_of_peak=out["model_only"]["tflops"] / peak if peak else None)
    out["model_only_more"] = []  # larger batches and torch.compile: what the card could give
    for batch, compiled in opts.more_model_only:
        try:
            row = model_only(instance, batch, opts.iters, compiled)
            row["share_of_peak"] = row["tflops"] / peak if peak else None
        except Exception as exc:  # noqa: BLE001 - recorded, the benchmark goes on
            row = {"batch": batch, "compiled": compiled, "error": f"{type(exc).__name__}: {exc}"}
        out["model_only_more"].append(row)
    out["in_process"] = in_process(instance, texts, opts.batch, opts.rounds)
    reference = instance.predict_texts(texts[:min(64, opts.batch)])
    del instance
    out["served"] = {}
    for w in opts.workers:  # one that cannot start (e.g. 2 workers on one card) is recorded
        try:
            out["served"][str(w)] = served(tags[w], texts, opts, reference)
        except Exception as exc:  # noqa: BLE001 - recorded in the results, the others go on
            out["served"][str(w)] = {"error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}
    ran = [v["texts_per_s"] for v in out["served"].values() if "error" not in v]
    best = max(ran) if ran else 0.0
    mo = out["model_only"]["seq_per_s"]
    out["verdict"] = {"served_over_model_only": best / mo,
                      "in_process_over_model_only": out["in_process"]["texts_per_s"] / mo,
                      "model_only_share_of_bf16_peak": out["model_only"]["share_of_peak"],
                      "targets": {"served_over_model_only": 0.5, "share_of_peak": 0.35}}
    return out


def table(res: dict[str, Any]) -> str:
    rows = [f"card: {res['card']}   weights: {res['model']['weights']}"]
    if "model_only" in res:
        m = res["model_only"]
        share = f"{m['share_of_peak']:.1%}" if m.get("share_of_peak") else "n/a"
        rows.append(f"model only     {m['seq_per_s']:>10.0f} seq/s  batch {m['batch']} "
                    f"len {m['seq_len']} {m['dtype']}  {m['tflops']:.1f} TFLOP/s = {share} "
                    "of peak")
        for r in res.get("model_only_more", []):
            rows.append(f"  batch {r['batch']:<5} compiled={r['compiled']!s:<5} " + (
                f"{r['seq_per_s']:>8.0f} seq/s {r['share_of_peak'] or 0:.1%} of peak"
                if "error" not in r else f"failed: {r['error'][:200]}"))
        rows.append(f"in-process     {res['in_process']['texts_per_s']:>10.0f} texts/s "
                    "(predict_texts: tokenise + forward + softmax)")
        for w, s in res["served"].items():
            if "error" in s:
                rows.append(f"served w={w:<4}  failed: {s['error'][:300]}")
                continue
            rows.append(f"served w={w:<4}  {s['texts_per_s']:>10.0f} texts/s  statuses "
                        f"{s['statuses']}  p50 {s['p50_ms']:.0f} ms  p99 {s['p99_ms']:.0f} ms  "
                        f"agree {s['labels_agree_with_in_process']}")
        v = res["verdict"]
        rows.append(f"served / model-only {v['served_over_model_only']:.2f} (target 0.5); "
                    f"in-process / model-only {v['in_process_over_model_only']:.2f}")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True,
                    help="a transformers checkpoint folder (config + tokenizer, weights optional)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--texts", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--concurrency", type=int, default=48)
    ap.add_argument("--texts-per-request", type=int, default=64)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--budget-s", type=float, default=40.0)
    ap.add_argument("--peak-tflops", type=float)
    ap.add_argument("--more-model-only", type=lambda s: [
        (int(b), c == "c") for b, _, c in (x.partition(":") for x in s.split(",") if x)],
        default=[(1024, False), (2048, False), (512, True), (2048, True)],
        help="extra model-only rows, BATCH[:c] (c: torch.compile), e.g. 1024,2048:c")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="no CUDA: run every step on the CPU at small sizes (tests the script)")
    ap.add_argument("--quick", action="store_true")
    opts = ap.parse_args(argv)
    opts.checkpoint = opts.checkpoint.resolve()
    opts.out = opts.out.resolve() if opts.out else None
    if opts.cpu_smoke or opts.quick:
        opts.batch, opts.iters, opts.texts, opts.rounds = 16, 3, 64, 1
        opts.clients, opts.concurrency, opts.texts_per_request = 2, 4, 8
        opts.requests, opts.budget_s = 16, 60.0
        opts.more_model_only = [(32, False)]
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    card = torch.cuda.get_device_name(0) if cuda else "cpu (no CUDA)"
    from bentos.machine import describe

    res = {"benchmark": "gpu_serving", "card": card, "cpu": describe(),
           "torch": torch.__version__, "time": datetime.now(timezone.utc).isoformat(),
           "args": {k: str(v) for k, v in vars(opts).items()}, **run(opts, cuda, card)}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    slug = re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-")
    out = opts.out or REPO / "benchmarks" / "results" / f"gpu-serving-{slug}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str))
    print(table(res))
    print(f"wrote {out}")
    if not cuda and not opts.cpu_smoke:
        print("no CUDA device: the bento was built; no GPU figures (exit 2)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
