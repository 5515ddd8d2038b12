"""Gather a registered version's model-card facts from what the run already knows, and publish.

The facts are the card's JSON form (layout: ``registry.card``): the pipeline file (description,
``card:`` section), the data (paths, sha256, rows, label counts per split, the suite's result,
the data docs artifact), the base checkpoint, the Optuna study, the test evaluation, the gate's
decision, the registry's live parts (aliases, ``maas.drift.*`` tags, champion history) and the
serving limits. Only counts, names and figures go in: never a text from the data, so a card is
safe whatever ``privacy.log_text`` says.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from pipelines.config import PipelineConfig
from pipelines.redact import redact_obj

log = logging.getLogger(__name__)

#: the BentoConfig fields a card lists as serving limits
SERVING_LIMITS = ("max_batch_size", "max_latency_ms", "max_texts", "max_chars", "timeout",
                  "max_concurrency", "workers")


def publish(cfg: PipelineConfig, run_id: str, version: str, **known: Any) -> dict[str, Any]:
    """Collect the facts of ``version`` (``known``: raw, data, report, study, best, ev, decision)
    and attach its card (version description, ``card/`` artifacts of ``run_id``)."""
    from registry import attach_card

    facts = collect(cfg, run_id, version, **known)
    attach_card(cfg.registry.model_name, version, facts, run_id)
    return facts


def record_bento(cfg: PipelineConfig, run_id: str, version: str, facts: dict[str, Any],
                 bento_tag: str) -> dict[str, Any]:
    """After packaging: the card names the bento that serves the version."""
    from registry import attach_card

    facts = {**facts, "serving": {**(facts.get("serving") or {}), "bento_tag": bento_tag}}
    attach_card(cfg.registry.model_name, version, facts, run_id)
    return facts


def collect(cfg: PipelineConfig, run_id: str, version: str, *, raw, data, report, study, best,
            ev, decision) -> dict[str, Any]:
    """The card's facts (JSON-serialisable, credentials masked)."""
    from registry import live_facts

    name = cfg.registry.model_name
    mv = MlflowClient().get_model_version(name, version)
    tags = mv.tags or {}
    live = live_facts(name, version)
    facts = {
        "schema": "maas-model-card/1",
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"name": name, "version": str(version), "run_id": run_id,
                  "model_uri": tags.get("maas.model_uri", mv.source),
                  "registered_at": tags.get("maas.registered_at"), "aliases": live["aliases"],
                  "family": cfg.model.family, "variant": tags.get("maas.variant") or "fp32"},
        "pipeline": {"name": cfg.name, "description": cfg.description,
                     "config_hash": cfg.config_hash(), "git_commit": tags.get("maas.git_commit")},
        "card": cfg.card.model_dump(mode="json"),
        "data": _data(raw, data, report, run_id),
        "base_checkpoint": _checkpoint(cfg),
        "study": _study(cfg, study, best),
        "evaluation": _evaluation(ev),
        "promotion": _promotion(decision, run_id),
        "drift": live["drift"],
        "alias_history": live["alias_history"],
        "serving": _serving(cfg),
        "machine": _machine(tags),
    }
    return redact_obj(_plain(facts))


def _machine(tags: dict[str, str]) -> dict[str, Any]:
    """The CPU the variant choice was measured on (the chosen variant's entry of the
    ``maas.variants`` tag; this machine when no table was recorded)."""
    import json

    from bentos.machine import describe

    try:
        entry = json.loads(tags.get("maas.variants") or "{}").get(
            tags.get("maas.variant") or "fp32") or {}
    except (ValueError, AttributeError):
        entry = {}
    recorded = entry.get("machine") if isinstance(entry.get("machine"), dict) else None
    return {**(recorded or describe()), "measured_for": "variant choice" if recorded
            else "card (no variant table)"}


def _data(raw, data, report, run_id: str) -> dict[str, Any]:
    files = [{"role": f"data.{role}", "path": path,
              "sha256": sha256_file(Path(path)) if Path(path).is_file() else None,
              "rows": len(raw.frames[role])} for role, path in raw.files.items()]
    splits = {"train": data.train, "validation": data.validation, "test": data.test}
    labels = list(data.id2label.values())
    return {
        "fingerprint": raw.fingerprint,
        "files": files,
        "splits": {k: len(df) for k, df in splits.items()},
        "labels": labels,
        "label_distribution": {k: dict(Counter(data.names(df))) for k, df in splits.items()},
        "suite": {"name": report.suite_name, "version": report.suite_version,
                  "success": report.success, "expectations": len(report.outcomes),
                  "failed": [o.expectation_type for o in report.failed]},
        "data_docs": _data_docs(run_id),
    }


def _data_docs(run_id: str) -> str | None:
    """The logged GX data docs' index page (or folder); None if none were logged."""
    client = MlflowClient()
    todo, seen = ["validation/data_docs"], 0
    while todo and seen < 200:
        folder = todo.pop(0)
        for item in client.list_artifacts(run_id, folder):
            seen += 1
            if item.is_dir:
                todo.append(item.path)
            elif item.path.endswith("/index.html"):
                return item.path
    return "validation/data_docs" if seen else None


def _checkpoint(cfg: PipelineConfig) -> dict[str, Any]:
    """What the model started from: the family's own card facts."""
    from pipelines.families import load_family

    return load_family(cfg).card_facts()


def _study(cfg: PipelineConfig, study, best) -> dict[str, Any]:
    trials = [{"number": t.number, "state": t.state.name, "value": t.value,
               "params": dict(t.params)} for t in study.trials]
    return {"name": study.study_name, "metric": cfg.metric, "direction": cfg.tuning.direction,
            "n_trials": cfg.tuning.n_trials,
            "states": dict(Counter(t["state"] for t in trials)),
            "best_trial": best.number, "best_value": best.value, "best_params": dict(best.params),
            "trials": trials}


def _evaluation(ev) -> dict[str, Any]:
    cm = [[int(x) for x in row] for row in ev.confusion.tolist()]
    per_class: dict[str, Any] = {}
    for i, label in enumerate(ev.labels):
        support, predicted = sum(cm[i]), sum(row[i] for row in cm)
        p = cm[i][i] / predicted if predicted else 0.0
        r = cm[i][i] / support if support else 0.0
        per_class[label] = {"precision": p, "recall": r,
                            "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": support}
    return {"metrics": {k: v for k, v in ev.metrics.items() if "." not in k},
            "per_class": per_class,
            "confusion": {"labels": list(ev.labels), "matrix": cm},
            "confusion_image": "evaluation/confusion_matrix.png"}


def _promotion(decision, run_id: str) -> dict[str, Any]:
    out = decision.to_dict()
    if not out.get("failed_thresholds"):
        out.pop("failed_thresholds", None)
    compared = MlflowClient().get_run(run_id).data.tags.get("maas.champion_compared")
    out["incumbent_version"] = compared
    return out


def _serving(cfg: PipelineConfig) -> dict[str, Any]:
    if not cfg.bento.enabled:
        return {"bento_tag": None, "limits": {}}
    return {"bento_tag": None,
            "limits": {k: getattr(cfg.bento, k) for k in SERVING_LIMITS}}


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _plain(obj: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/inf to None, tuples to lists, keys to str."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)
