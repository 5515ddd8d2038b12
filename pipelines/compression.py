"""Compression variants of the tuned model, built, measured and logged after tuning.

Each variant the pipeline file asks for (``compression.variants``; ``fp32`` is always the
reference) is built with a maintained library (ONNX export + ONNX Runtime fusion/quantisation,
structured pruning + recovery fine-tune), measured on the gate's test set the way it is served,
and logged as a child MLflow run of the pipeline run (figures, settings, and its model: the
``mlflow.onnx`` flavour with the tokenizer as extra files, or the transformers flavour). A variant
whose build fails is skipped with its reason recorded (a FAILED child run); the others go on.
The choice itself is the registry's pure gate, :func:`registry.choose_variant`.
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

from pipelines import onnx_variants as ox
from pipelines.variant_speed import TorchClassifier, figures, measure

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
    model: Any = None            # torch variants: the transformers model (for logging)
    onnx_path: Path | None = None
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
            }
        return out


class _Builder:
    """Builds the requested variants in dependency order, caching shared steps (the pruned model,
    each fused ONNX graph)."""

    def __init__(self, cfg, data, model, tokenizer, workdir: Path) -> None:
        self.cfg, self.data, self.model, self.tok, self.dir = cfg, data, model, tokenizer, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.max_length = cfg.model.max_length
        self.threads = cfg.compression.threads or ox.cpu_cores()
        self._pruned: Any = None
        self._pruned_error: str | None = None
        self._graphs: dict[str, tuple[Path, dict[str, Any]]] = {}

    def with_int8(self, mode: str, per_channel: bool, workdir: Path) -> _Builder:
        """A builder with other int8 settings that reuses this one's pruned model and fused
        graphs (so alternatives are compared on the same weights)."""
        comp = self.cfg.compression
        int8 = comp.int8.model_copy(update={"mode": mode, "per_channel": per_channel})
        cfg = self.cfg.model_copy(update={"compression": comp.model_copy(update={"int8": int8})})
        other = _Builder(cfg, self.data, self.model, self.tok, workdir)
        other._graphs = {k: v for k, v in self._graphs.items() if not k.endswith("int8")}
        other._pruned, other._pruned_error = self._pruned, self._pruned_error
        other._pruned_details = dict(getattr(self, "_pruned_details", {}))
        return other

    def build(self, name: str) -> Variant:
        base, _, fmt = name.partition("+") if name.startswith("pruned") else ("", "", name)
        model, extra = (self.pruned(), dict(self._pruned_details)) if base else (self.model, {})
        if fmt in ("", "fp32"):
            return Variant(name, "torch", TorchClassifier(model, self.tok, self.max_length),
                           _params(model), self._torch_size(model, name), extra, model=model)
        path, settings = self.onnx_graph(name, model, fmt)
        clf = ox.OrtClassifier(path, self.tok, self.max_length, self.threads,
                               ox.available_providers())
        return Variant(name, "onnxruntime", clf, _params(model), path.stat().st_size / 1e6,
                       {**extra, **settings, "providers": clf.session.get_providers()},
                       onnx_path=path)

    def pruned(self):
        if self._pruned_error:
            raise RuntimeError(f"needs the pruned model, which failed: {self._pruned_error}")
        if self._pruned is None:
            try:
                self._prune()
            except Exception as exc:
                self._pruned_error = f"{type(exc).__name__}: {exc}"
                raise
        return self._pruned

    def _prune(self) -> None:
        from pipelines.pruning import prune_and_recover

        p = self.cfg.compression.pruning
        train = self.data.train
        settings = p.model_dump(exclude={"amount"})
        res = prune_and_recover(self.model, self.tok, train.text.tolist(),
                                self.data.ids(train), max_length=self.max_length,
                                seed=self.cfg.tuning.sampler_seed, **settings)
        self._pruned = res.model
        self._pruned_details = {
            "params_before": res.params_before, "params_after": res.params_after,
            "nonembedding_params_before": res.nonembedding_before,
            "nonembedding_params_after": res.nonembedding_after,
            **{f"pruning.{k}": v for k, v in res.details.items()}}

    def onnx_graph(self, name: str, model, fmt: str) -> tuple[Path, dict[str, Any]]:
        key = ("pruned-" if name.startswith("pruned") else "") + fmt
        if key in self._graphs:
            return self._graphs[key]
        src = "pruned-onnx" if key.startswith("pruned") else "onnx"
        if fmt == "onnx":
            raw, fused = self.dir / f"{src}-export.onnx", self.dir / f"{src}.onnx"
            ox.export(model, self.tok, raw, self.max_length)
            ops = ox.optimize(raw, fused, model.config)
            self._graphs[key] = (fused, {"fused_ops": json.dumps(ops, sort_keys=True)})
            return self._graphs[key]
        fused, settings = self.onnx_graph(name, model, "onnx")
        q = self.cfg.compression.int8
        out = self.dir / f"{key}.onnx"
        calib = None
        if q.mode == "static":
            texts = self.data.train.text.tolist()[:q.calibration_rows]
            calib = ox.calibration_batches(self.tok, texts, self.max_length,
                                           ox.OrtClassifier(fused, self.tok, 8).inputs)
        ox.quantize(fused, out, mode=q.mode, per_channel=q.per_channel, calibration=calib)
        self._graphs[key] = (out, {**settings, "int8.mode": q.mode,
                                   "int8.per_channel": q.per_channel})
        return self._graphs[key]

    def _torch_size(self, model, name: str) -> float:
        folder = self.dir / f"{name}-torch"
        model.save_pretrained(folder, safe_serialization=True)
        return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6


def _params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def compress(cfg, data, model, tokenizer, family, labels: list[str],
             evaluate: Callable[[Any], dict[str, float]]) -> Outcome:
    """Build, measure and log every variant; pick the one to serve. ``evaluate(probs)`` scores
    test-set probabilities with the same metrics as the gate. Runs inside the pipeline run."""
    with tempfile.TemporaryDirectory(prefix="maas-variants-") as tmp:
        builder = _Builder(cfg, data, model, tokenizer, Path(tmp))
        names = [REFERENCE] + [v for v in cfg.compression.variants if v != REFERENCE]
        variants = {n: try_build(builder, n) for n in names}
        outcome = measure_and_choose(cfg, data, variants, evaluate, builder.threads)
        for v in variants.values():
            _log_variant(v, outcome, family, tokenizer, labels, cfg.model.max_length)
    return outcome


def builder(cfg, data, model, tokenizer, workdir: Path) -> _Builder:
    """A variant builder (for benchmarks: build variants under other settings side by side)."""
    return _Builder(cfg, data, model, tokenizer, workdir)


def measure_and_choose(cfg, data, variants: dict[str, Variant],
                       evaluate: Callable[[Any], dict[str, float]], threads: int) -> Outcome:
    """Measure the built variants side by side on the test set and apply the variant gate."""
    from registry import choose_variant

    comp = cfg.compression
    if variants[REFERENCE].error:
        raise RuntimeError(f"the fp32 reference could not be measured: "
                           f"{variants[REFERENCE].error}")
    ok = {n: v for n, v in variants.items() if not v.error}
    measured = measure({n: v.clf for n, v in ok.items()}, data.test.text.tolist(),
                       threads=threads, rounds=comp.speed_rounds,
                       latency_samples=comp.latency_samples)
    ref = measured[REFERENCE].probs
    for n, v in ok.items():
        v.figures = figures(measured[n], ref, evaluate(measured[n].probs))
        v.figures.update(size_mb=v.size_mb, params=v.params)
    choice = choose_variant({n: v.figures for n, v in ok.items()}, cfg.promotion.metric,
                            comp.max_accuracy_drop)
    return Outcome(variants, choice, cfg.promotion.metric, comp.max_accuracy_drop)


def try_build(builder: _Builder, name: str) -> Variant:
    try:
        v = builder.build(name)
        log.info("variant %s built (%s, %.1f MB)", name, v.runtime, v.size_mb)
        return v
    except Exception as exc:  # a failing variant is skipped, never fatal: fp32 always serves
        log.warning("variant %s skipped: %s: %s", name, type(exc).__name__, exc, exc_info=True)
        return Variant(name, error=f"{type(exc).__name__}: {exc}")


def _log_variant(v: Variant, outcome: Outcome, family, tokenizer, labels: list[str],
                 max_length: int) -> None:
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
                v.model_uri = (_log_onnx(v, tokenizer, labels, max_length) if v.onnx_path
                               else family.log_model(v.model, tokenizer, "model",
                                                     ["an example text"]).model_uri)
    if v.error:  # after the with-block: ending it inside would end the parent run
        MlflowClient().set_terminated(v.run_id, status="FAILED")


def _log_onnx(v: Variant, tokenizer, labels: list[str], max_length: int) -> str:
    """``mlflow.onnx`` model (single file) with the tokenizer and ``maas_variant.json`` as extra
    files, and a tensor signature (batch and sequence axes dynamic)."""
    import numpy as np
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    sig = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.int64), (-1, -1), n) for n in v.clf.inputs]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(labels)), "logits")]))
    meta = {"variant": v.name, "runtime": "onnxruntime", "labels": labels,
            "max_length": max_length, "input_names": v.clf.inputs, "output_name": "logits"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer.save_pretrained(folder)
        (folder / "maas_variant.json").write_text(json.dumps(meta, indent=2), "utf-8")
        extra = [str(p) for p in sorted(folder.iterdir()) if p.is_file()]
        info = mlflow.onnx.log_model(onnx_model=onnx.load(str(v.onnx_path)), name="model",
                                     signature=sig, save_as_external_data=False,
                                     extra_files=extra, pip_requirements=_onnx_requirements(),
                                     metadata={"maas_variant": v.name})
    return info.model_uri


def _onnx_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for pkg in ("mlflow", "onnx", "onnxruntime", "tokenizers", "transformers"):
        try:
            pins.append(f"{pkg}=={version(pkg).split('+', 1)[0]}")
        except PackageNotFoundError:
            pass
    return pins


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
    head = ("| variant | runtime | MB | params | texts/s b32 | best pass | p50 ms b1 | "
            f"{outcome.metric} | drop vs fp32 | agreement | servable |\n"
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
    rows = []
    for n, v in outcome.variants.items():
        if v.error:
            rows.append(f"| {n} | - | - | - | - | - | - | - | - | - | skipped: {v.error[:120]} |")
            continue
        f = v.figures
        mark = "**chosen**" if n == outcome.choice.chosen else (
            "yes" if outcome.choice.within_budget.get(n) else "no (over budget)")
        rows.append(f"| {n} | {v.runtime} | {v.size_mb:.1f} | {v.params:,} | "
                    f"{f['texts_per_s']:.1f} | {f['forward_batch_size']} | {f['p50_ms_b1']:.2f} | "
                    f"{f[outcome.metric]:.4f} | "
                    f"{outcome.choice.drops[n]:+.4f} | {f['agreement_with_fp32']:.4f} | {mark} |")
    return head + "\n".join(rows) + "\n"


def version_tags(outcome: Outcome) -> dict[str, str]:
    """Tags for the registered version: the chosen variant and the whole table (JSON)."""
    return {"maas.variant": outcome.choice.chosen,
            "maas.variant_reason": outcome.choice.reason[:5000],
            "maas.variants": json.dumps(outcome.table(), sort_keys=True)}
