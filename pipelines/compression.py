"""Compression variants of the tuned model, built, measured and logged after tuning (any family).

Each variant the pipeline file asks for (``compression.variants``; ``fp32`` is always the
reference) is built by the family's compressor (:meth:`pipelines.families.base.Family.compressor`;
the text family's: ONNX export + ONNX Runtime fusion/quantisation, structured pruning + recovery),
measured on the gate's test set the way it is served, and logged as a child MLflow run of the
pipeline run (figures, settings, and its model, logged by the compressor). A variant whose build
fails, or that the family does not build, is skipped with its reason recorded (a FAILED child
run); the others go on. The choice itself is the registry's pure gate,
:func:`registry.choose_variant`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow

from bentos.machine import summary as machine_summary
from pipelines.families.base import BuiltVariant, Compressor
from pipelines.variant_speed import figures, measure

log = logging.getLogger(__name__)

REFERENCE = "fp32"


@dataclass
class Variant:
    name: str
    runtime: str = ""
    clf: Any = None
    params: int = 0
    size_mb: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    built: BuiltVariant | None = None  # as the family's compressor built it (for logging)
    error: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    model_uri: str | None = None


@dataclass
class Outcome:
    variants: dict[str, Variant]
    choice: Any                  # registry.VariantChoice
    metric: str
    max_drop: float
    unit: str = "texts"          # what its speed figures count (Family.unit)

    def table(self) -> dict[str, dict[str, Any]]:
        """Per variant: what the registry tag ``maas.variants`` and the bento build read."""
        out = {}
        for name, v in self.variants.items():
            if v.error:
                out[name] = {"error": v.error[:300], "within_budget": False}
                continue
            f = v.figures
            out[name] = {
                "runtime": v.runtime, "model_uri": v.model_uri, "run_id": v.run_id,
                "within_budget": bool(self.choice.within_budget.get(name)),
                "accuracy": round(f["accuracy"], 6),
                # the budget is on the gate metric (promotion.metric), accuracy by default
                "metric": self.metric, "metric_value": round(f[self.metric], 6),
                "accuracy_drop": round(self.choice.drops[name], 6),
                "max_accuracy_drop": self.max_drop,
                "texts_per_s": round(f["texts_per_s"], 2),
                "forward_batch_size": f["forward_batch_size"],
                "p50_ms_b1": round(f["p50_ms_b1"], 3),
                "size_mb": round(v.size_mb, 2), "params": v.params,
                "machine": f.get("machine"),  # the CPU the figures (and the choice) hold for
            }
        return out


def compress(cfg, data, model, family, evaluate: Callable[[Any], dict[str, float]]) -> Outcome:
    """Build, measure and log every variant of ``model`` (the family's tuned model); pick the one
    to serve. ``evaluate(probs)`` scores test-set probabilities with the same metrics as the
    gate. Runs inside the pipeline run."""
    labels = family.labels(model)
    with tempfile.TemporaryDirectory(prefix="maas-variants-") as tmp:
        comp = family.compressor(model, data, Path(tmp))
        names = [v for v in requested(cfg, family) if v != REFERENCE]
        variants = {REFERENCE: try_build(comp, REFERENCE)}
        for n in names:
            variants[n] = (try_build(comp, n) if n in family.variants else Variant(
                n, error=f"the {type(family).__name__} family builds no variant {n!r} "
                         f"(it builds {list(family.variants)})"))
        outcome = measure_and_choose(cfg, data, variants, evaluate, comp.threads, family)
        for v in variants.values():
            _log_variant(v, outcome, comp, labels)
    return outcome


def requested(cfg, family) -> list[str]:
    """The variants to make: the pipeline file's ``compression.variants``, else the family's
    defaults (:attr:`~pipelines.families.base.Family.default_variants`)."""
    if cfg.compression.variants is not None:
        return list(cfg.compression.variants)
    defaults = family.default_variants
    return list(family.variants if defaults is None else defaults)


def builder(cfg, data, model, tokenizer, workdir: Path):
    """The text family's variant builder (benchmarks: variants under other settings side by
    side)."""
    from pipelines.families.text_classifier_variants import TextCompressor

    return TextCompressor(cfg, data, model, tokenizer, workdir)


def measure_and_choose(cfg, data, variants: dict[str, Variant],
                       evaluate: Callable[[Any], dict[str, float]], threads: int,
                       family=None) -> Outcome:
    """Measure the built variants side by side on the family's inputs of the test set and apply
    the variant gate, with the family's ``agreement`` figures, ``variant_floors`` and ``unit``
    (``family``: the pipeline's, loaded from ``cfg`` when None)."""
    from registry import choose_variant

    comp = cfg.compression
    if variants[REFERENCE].error:
        raise RuntimeError(f"the fp32 reference could not be measured: "
                           f"{variants[REFERENCE].error}")
    if family is None:
        from pipelines.families import load_family

        family = load_family(cfg)
    ok = {n: v for n, v in variants.items() if not v.error}
    measured = measure({n: v.clf for n, v in ok.items()}, family.inputs(data.test),
                       threads=threads, rounds=comp.speed_rounds,
                       latency_samples=comp.latency_samples)
    ref = measured[REFERENCE].probs
    for n, v in ok.items():
        v.figures = figures(measured[n], ref, evaluate(measured[n].probs),
                            family.agreement(measured[n].probs, ref))
        v.figures.update(size_mb=v.size_mb, params=v.params)
    choice = choose_variant({n: v.figures for n, v in ok.items()}, cfg.promotion.metric,
                            comp.max_accuracy_drop, floors=dict(family.variant_floors),
                            unit=family.unit)
    return Outcome(variants, choice, cfg.promotion.metric, comp.max_accuracy_drop, family.unit)


def try_build(builder: Compressor, name: str) -> Variant:
    """The compressor's variant ``name``; a failure is recorded on the variant, never raised."""
    try:
        b = builder.build(name)
        log.info("variant %s built (%s, %.1f MB)", name, b.runtime, b.size_mb)
        return Variant(b.name, b.runtime, b.clf, b.params, b.size_mb, dict(b.settings), built=b)
    except Exception as exc:  # a failing variant is skipped, never fatal: fp32 always serves
        log.warning("variant %s skipped: %s: %s", name, type(exc).__name__, exc, exc_info=True)
        return Variant(name, error=f"{type(exc).__name__}: {exc}")


def _log_variant(v: Variant, outcome: Outcome, comp: Compressor, labels: list[str]) -> None:
    """One child run per variant: settings as params, figures as metrics, and its model (fp32's
    is the registered version's own). Over-budget variants are logged as evidence, never served."""
    from mlflow import MlflowClient

    servable = not v.error and bool(outcome.choice.within_budget.get(v.name))
    tags = {"maas.role": "variant", "maas.variant": v.name, "maas.runtime": v.runtime or "-",
            "maas.within_budget": str(servable).lower(),
            "maas.chosen": str(v.name == outcome.choice.chosen).lower()}
    with mlflow.start_run(run_name=f"variant-{v.name}", nested=True, tags=tags) as run:
        v.run_id = run.info.run_id
        if v.error:
            mlflow.set_tag("maas.variant_error", v.error[:5000])
        else:
            mlflow.log_params({k: str(val)[:500] for k, val in
                               {"runtime": v.runtime, **v.settings}.items()})
            mlflow.log_metrics({k: float(val) for k, val in v.figures.items()
                                if isinstance(val, (int, float))})
            mlflow.log_metric("accuracy_drop_vs_fp32", outcome.choice.drops[v.name])
            if v.name != REFERENCE:  # fp32 is the registered version's own model
                v.model_uri = comp.log(v.built, labels)
    if v.error:  # after the with-block: ending it inside would end the parent run
        MlflowClient().set_terminated(v.run_id, status="FAILED")


def record(outcome: Outcome) -> None:
    """The variant table and the choice on the pipeline run: artifacts (JSON + Markdown, shown in
    the MLflow UI) and headline metrics."""
    c = outcome.choice
    doc = {"chosen": c.chosen, "reason": c.reason, "metric": c.metric, "max_drop": c.max_drop,
           "speedup_vs_fp32": c.speedup, "accuracy_delta": -c.drop,
           "variants": outcome.table()}
    mlflow.log_dict(doc, "compression/variants.json")
    mlflow.log_text(markdown_table(outcome), "compression/variants.md")
    mlflow.log_metrics({"compression_speedup_vs_fp32": c.speedup,
                        "compression_accuracy_drop": c.drop})
    mlflow.set_tags({"maas.variant": c.chosen, "maas.variant_reason": c.reason[:5000]})


def markdown_table(outcome: Outcome) -> str:
    u = outcome.unit
    head = (f"| variant | runtime | MB | params | {u}/s b32 | rounds min-max | CPU ms/{u[:-1]} | "
            f"best pass | p50 ms b1 | {outcome.metric} | drop vs fp32 | agreement | servable |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
    rows = []
    for n, v in outcome.variants.items():
        if v.error:
            rows.append(f"| {n} | - | - | - | - | - | - | - | - | - | - | - | "
                        f"skipped: {v.error[:120]} |")
            continue
        f = v.figures
        mark = "**chosen**" if n == outcome.choice.chosen else (
            "yes" if outcome.choice.within_budget.get(n) else "no (over budget)")
        rounds = f.get("texts_per_s_rounds") or [f["texts_per_s"]]
        cpu = f.get("cpu_ms_per_text")
        rows.append(f"| {n} | {v.runtime} | {v.size_mb:.1f} | {v.params:,} | "
                    f"{f['texts_per_s']:.1f} | {min(rounds):.1f}-{max(rounds):.1f} | "
                    f"{'-' if cpu is None else f'{cpu:.2f}'} | "
                    f"{f['forward_batch_size']} | {f['p50_ms_b1']:.2f} | "
                    f"{f[outcome.metric]:.4f} | "
                    f"{outcome.choice.drops[n]:+.4f} | {f['agreement_with_fp32']:.4f} | {mark} |")
    measured = next((v.figures.get("machine") for v in outcome.variants.values()
                     if v.figures.get("machine")), None)
    where = f"\nMeasured on {machine_summary(measured)}.\n" if measured else ""
    return head + "\n".join(rows) + "\n" + where


def version_tags(outcome: Outcome) -> dict[str, str]:
    """Tags for the registered version: the chosen variant and the whole table (JSON)."""
    return {"maas.variant": outcome.choice.chosen,
            "maas.variant_reason": outcome.choice.reason[:5000],
            "maas.variants": json.dumps(outcome.table(), sort_keys=True)}
