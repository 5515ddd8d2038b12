"""Compression variants of the default pipeline's model, measured side by side.

Takes the fp32 model of a registered version (default ``models:/sst2-sentiment@champion`` in the
tracking store of the current directory: run ``maas run`` first), builds every variant with the
pipeline's own code (pipelines/compression.py) and the pipeline file's settings, plus the int8
alternatives the issue asks to compare (dynamic per-channel, dynamic per-tensor, static QDQ
calibrated on training rows) and the opt-in pruned variants, measures them all in one
interleaved run on the pipeline's test set (texts/s at batch 32 with all cores, p50 ms at batch
1, accuracy, agreement with fp32) and applies the pipeline's variant gate to the pipeline's own
variants (and, as ``with_pruning_opted_in``, to them plus the pruned ones). Prints a table and
writes benchmarks/results/compression-<timestamp>.json with ``chosen``, ``speedup_vs_fp32`` and
``accuracy_delta`` (chosen vs fp32) at the top level.

    python benchmarks/compression.py [--pipeline pipelines/sentiment.yaml]
                                     [--model-uri models:/sst2-sentiment@champion] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO))
for key, value in {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error",
                   "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)

#: int8 alternatives measured beside the pipeline's variants: (suffix, mode, per_channel)
INT8_ALTERNATIVES = [("dynamic-per-channel", "dynamic", True),
                     ("dynamic-per-tensor", "dynamic", False),
                     ("static-qdq", "static", True)]
#: variants measured even when the pipeline file leaves them out (pruning is opt-in)
OPT_IN = ("pruned", "pruned+onnx-int8")


def _cpu() -> dict:
    """The CPU this ran on: model, ISA features (AVX2, AVX-512, VNNI, BF16, AMX), threads."""
    from bentos.machine import describe

    return {"cpu": describe()}


def load(args):
    from pipelines.config import PipelineConfig
    from pipelines.data import load_data, split_data
    from pipelines.families import get_family

    cfg = PipelineConfig.load(args.pipeline, {"compression.speed_rounds": args.rounds})
    data = split_data(load_data(cfg.data), cfg.data)
    family = get_family(cfg.model.family)
    uri = args.model_uri or f"models:/{cfg.registry.model_name}@champion"
    model, tok = family.load_logged(uri)
    return cfg, data, family, model.eval(), tok, uri


def build_all(cfg, data, model, tok, workdir: Path):
    """The pipeline's variants (its own int8 settings) plus each int8 alternative."""
    from pipelines import compression as comp

    main = comp.builder(cfg, data, model, tok, workdir / "main")
    from pipelines.families import load_family

    names = [comp.REFERENCE] + [v for v in comp.requested(cfg, load_family(cfg))
                                if v != comp.REFERENCE]
    variants = {n: comp.try_build(main, n) for n in names}
    extra = {n: comp.try_build(main, n) for n in OPT_IN if n not in variants}
    for suffix, mode, per_channel in INT8_ALTERNATIVES:
        b = main.with_int8(mode, per_channel, workdir / suffix)
        for base in ("onnx-int8", "pruned+onnx-int8"):
            v = comp.try_build(b, base)
            v.name = f"{base} [{suffix}]"
            extra[v.name] = v
    return variants, extra, main.threads


def _encoder_cut(pruned: dict) -> float | None:
    """Parameter reduction outside the embedding tables (what pruning can touch and what the
    per-token compute scales with); None without a pruned variant."""
    s = pruned.get("settings", {})
    if "nonembedding_params_before" not in s:
        return None
    return 1 - int(s["nonembedding_params_after"]) / int(s["nonembedding_params_before"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pipeline", default=str(REPO / "pipelines" / "sentiment.yaml"))
    ap.add_argument("--model-uri", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from pipelines import compression as comp
    from pipelines.evaluation import evaluate_predictions
    from registry import choose_variant

    cfg, data, family, model, tok, uri = load(args)
    labels, names, truth = family.labels_of(model), list(data.id2label.values()), \
        data.names(data.test)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="maas-bench-") as tmp:
        variants, extra, threads = build_all(cfg, data, model, tok, Path(tmp))
        build_s = time.time() - t0
        every = {**variants, **extra}
        outcome = comp.measure_and_choose(
            cfg, data, every, lambda p: evaluate_predictions(truth, p, labels, names).metrics,
            threads)
    own = {n: v.figures for n, v in variants.items() if not v.error}
    choice = choose_variant(own, cfg.promotion.metric, cfg.compression.max_accuracy_drop)
    opted = {**own, **{n: every[n].figures for n in OPT_IN if not every[n].error}}
    with_opt_in = choose_variant(opted, cfg.promotion.metric, cfg.compression.max_accuracy_drop)
    report(cfg, uri, outcome, choice, variants, threads, build_s, args.rounds, with_opt_in)


def report(cfg, uri, outcome, choice, variants, threads, build_s, rounds, with_opt_in) -> None:
    """``choice`` is the gate over the pipeline's own variants (the alternatives only inform);
    ``with_opt_in`` the same gate had the pipeline file listed the pruned variants too."""
    table = {}
    for n, v in outcome.variants.items():
        if v.error:
            table[n] = {"error": v.error}
            continue
        f = v.figures
        table[n] = {"runtime": v.runtime, "size_mb": round(v.size_mb, 2), "params": v.params,
                    "texts_per_s_b32": round(f["texts_per_s"], 1),
                    "texts_per_s_rounds": f["texts_per_s_rounds"],
                    "cpu_ms_per_text": f.get("cpu_ms_per_text"),
                    "cpu_ms_per_text_rounds": f.get("cpu_ms_per_text_rounds"),
                    "forward_batch_size": f.get("forward_batch_size"),
                    "texts_per_s_by_forward": f.get("texts_per_s_by_forward"),
                    "p50_ms_b1": round(f["p50_ms_b1"], 2), "accuracy": round(f["accuracy"], 4),
                    "f1_macro": round(f["f1_macro"], 4),
                    "delta_vs_fp32": round(f["accuracy"] - own_ref(outcome), 4),
                    "agreement_with_fp32": round(f["agreement_with_fp32"], 4),
                    "speedup_vs_fp32": round(f["texts_per_s"] / ref_speed(outcome), 2),
                    "pipeline_variant": n in variants,
                    "within_budget": n in variants and bool(choice.within_budget.get(n)),
                    "settings": {k: str(val) for k, val in v.settings.items()}}
    print_table(table, choice)
    pruned = table.get("pruned", {})
    doc = {
        "chosen": choice.chosen, "speedup_vs_fp32": round(choice.speedup, 3),
        "accuracy_delta": round(-choice.drop, 4), "reason": choice.reason,
        "with_pruning_opted_in": {"chosen": with_opt_in.chosen,
                                  "speedup_vs_fp32": round(with_opt_in.speedup, 3),
                                  "accuracy_delta": round(-with_opt_in.drop, 4)},
        "targets": {"speedup_ge_3x_within_1pt": bool(choice.speedup >= 3 and choice.drop <= 0.01),
                    "pruned_params_reduction": (1 - pruned["params"] / table["fp32"]["params"])
                    if "params" in pruned else None,
                    "pruned_encoder_params_reduction": _encoder_cut(pruned)},
        "model_uri": uri, "pipeline": str(cfg.source_file), "max_accuracy_drop":
            cfg.compression.max_accuracy_drop, "threads": threads, "rounds": rounds,
        "build_seconds": round(build_s, 1), "table": table,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_after": os.getloadavg(), **_cpu()},
        "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"compression-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    cut = doc["targets"]["pruned_params_reduction"] or 0.0
    enc = doc["targets"]["pruned_encoder_params_reduction"] or 0.0
    print(f"\nchosen {choice.chosen}: {choice.speedup:.2f}x fp32, accuracy delta "
          f"{-choice.drop:+.4f}; pruned model params -{cut:.1%} (outside the embedding "
          f"tables -{enc:.1%}); with pruning opted in: {with_opt_in.chosen} "
          f"{with_opt_in.speedup:.2f}x"
          f"\nwrote {out.relative_to(REPO)}")


def own_ref(outcome) -> float:
    return outcome.variants["fp32"].figures["accuracy"]


def ref_speed(outcome) -> float:
    return outcome.variants["fp32"].figures["texts_per_s"]


def print_table(table: dict, choice) -> None:
    cols = f"{'variant':<36}{'MB':>7}{'params':>12}{'texts/s':>9}{'x fp32':>8}{'p50 ms':>8}" \
           f"{'acc':>8}{'delta':>8}{'agree':>7}  gate"
    print(cols + "\n" + "-" * len(cols))
    for n, r in table.items():
        if "error" in r:
            print(f"{n:<36}  skipped: {r['error'][:80]}")
            continue
        gate = ("CHOSEN" if n == choice.chosen else "ok" if r["within_budget"] else
                "over budget" if r["pipeline_variant"] else "(alternative)")
        print(f"{n:<36}{r['size_mb']:>7.1f}{r['params']:>12,}{r['texts_per_s_b32']:>9.1f}"
              f"{r['speedup_vs_fp32']:>8.2f}{r['p50_ms_b1']:>8.2f}{r['accuracy']:>8.4f}"
              f"{r['delta_vs_fp32']:>+8.4f}{r['agreement_with_fp32']:>7.3f}  {gate}")


if __name__ == "__main__":
    main()
