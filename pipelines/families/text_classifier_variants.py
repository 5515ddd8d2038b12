"""The text family's compression variants (its :class:`~pipelines.families.base.Compressor`).

``onnx`` (export + ONNX Runtime transformer fusion), ``onnx-int8`` (dynamic or static QDQ int8 of
the fused graph), ``pruned`` (structured pruning + distilled recovery, torch), ``distilled`` (a
student with fewer layers, pipelines/distillation.py) and their combinations ``pruned+onnx``,
``distilled+onnx-int8``, ... Shared steps (the pruned model, the student, each fused graph) are
built once. ONNX variants are logged as ``mlflow.onnx`` models with the tokenizer and
``maas_variant.json`` as extra files; torch ones with the transformers flavour.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow

from pipelines import onnx_variants as ox
from pipelines.families.base import BuiltVariant
from pipelines.variant_speed import TorchClassifier


class TextCompressor:
    """Builds the requested variants in dependency order, caching shared steps (the pruned model,
    each fused ONNX graph)."""

    def __init__(self, cfg, data, model, tokenizer, workdir: Path) -> None:
        self.cfg, self.data, self.model, self.tok, self.dir = cfg, data, model, tokenizer, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.max_length = cfg.model.max_length
        self.threads = cfg.compression.threads or ox.cpu_cores()
        self._pruned: Any = None
        self._pruned_error: str | None = None
        self._pruned_details: dict[str, Any] = {}
        self._students: dict[str, tuple[Any, dict[str, Any]] | str] = {}  # base -> model or error
        self._graphs: dict[str, tuple[Path, dict[str, Any]]] = {}

    def with_int8(self, mode: str, per_channel: bool, workdir: Path) -> TextCompressor:
        """A compressor with other int8 settings that reuses this one's pruned model and fused
        graphs (so alternatives are compared on the same weights)."""
        comp = self.cfg.compression
        int8 = comp.int8.model_copy(update={"mode": mode, "per_channel": per_channel})
        cfg = self.cfg.model_copy(update={"compression": comp.model_copy(update={"int8": int8})})
        other = TextCompressor(cfg, self.data, self.model, self.tok, workdir)
        other._graphs = {k: v for k, v in self._graphs.items() if not k.endswith("int8")}
        other._pruned, other._pruned_error = self._pruned, self._pruned_error
        other._pruned_details = dict(self._pruned_details)
        other._students = dict(self._students)
        return other

    def build(self, name: str) -> BuiltVariant:
        base, _, fmt = name.partition("+") if name.startswith(_STUDENTS) else ("", "", name)
        model, extra = self.student(base) if base else (self.model, {})
        if fmt in ("", "fp32"):
            return BuiltVariant(name, "torch", TorchClassifier(model, self.tok, self.max_length),
                                _params(model), self._torch_size(model, name), extra,
                                artifact=model)
        path, settings = self.onnx_graph(name, model, fmt)
        clf = ox.OrtClassifier(path, self.tok, self.max_length, self.threads,
                               ox.available_providers())
        return BuiltVariant(name, "onnxruntime", clf, _params(model), path.stat().st_size / 1e6,
                            {**extra, **settings, "providers": clf.session.get_providers()},
                            artifact=path)

    def log(self, variant: BuiltVariant, labels: list[str]) -> str:
        if isinstance(variant.artifact, Path):
            return _log_onnx(variant, self.tok, labels, self.max_length)
        from pipelines.families.text_classifier_model import log_model

        return log_model(variant.artifact, self.tok, "model", ["an example text"]).model_uri

    def student(self, base: str) -> tuple[Any, dict[str, Any]]:
        """The smaller torch model a variant starts from ("pruned" or "distilled"), made once,
        and its details (the child run's params)."""
        if base == "pruned":
            return self.pruned(), dict(self._pruned_details)
        made = self._students.get(base)
        if isinstance(made, str):
            raise RuntimeError(f"needs the {base} model, which was not made: {made}")
        if made is None:
            try:
                made = self._distill()
            except Exception as exc:
                self._students[base] = f"{type(exc).__name__}: {exc}"
                raise
            self._students[base] = made
        return made[0], dict(made[1])

    def _distill(self) -> tuple[Any, dict[str, Any]]:
        from pipelines.distillation import distill

        s = self.cfg.compression.distillation
        train = self.data.train
        texts, labels = train.text.tolist(), [int(y) for y in self.data.ids(train)]
        extra = _unlabelled(self.cfg, s)
        res = distill(self.model, self.tok, texts + extra, labels + [-100] * len(extra), s,
                      max_length=self.max_length, seed=self.cfg.tuning.sampler_seed)
        return res.model, {f"distillation.{k}": v for k, v in res.details.items()}

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
        base = name.partition("+")[0] if name.startswith(_STUDENTS) else ""
        key = (f"{base}-" if base else "") + fmt
        if key in self._graphs:
            return self._graphs[key]
        src = f"{base}-onnx" if base else "onnx"
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


#: variant prefixes that start from a smaller torch model instead of the tuned one
_STUDENTS = ("pruned", "distilled")


def _unlabelled(cfg, s) -> list[str]:
    """The unlabelled texts of ``compression.distillation.unlabelled_path`` (at most
    ``max_unlabelled_rows``): a .txt file, one text per line, or a table with the data's text
    column."""
    from pipelines.data import DataError, check_regular_file, column, read_frame

    if s.unlabelled_path is None:
        return []
    path, field = s.unlabelled_path, "compression.distillation.unlabelled_path"
    try:
        if path.suffix == ".txt":
            check_regular_file(path, "unlabelled_path")
            lines = path.read_text("utf-8").splitlines()
            texts = [t.strip() for t in lines if t.strip()]
        else:
            df = read_frame(path, cfg.data, "unlabelled_path")
            col = column(df, cfg.data.text_column, "text_column", path)
            texts = [str(t).strip() for t in col.dropna() if str(t).strip()]
    except (DataError, UnicodeDecodeError) as exc:
        raise DataError(f"{field}: {exc}") from None
    if not texts:
        raise DataError(f"{field}: {path} holds no texts")
    return texts[:s.max_unlabelled_rows]


def _params(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _log_onnx(v: BuiltVariant, tokenizer, labels: list[str], max_length: int) -> str:
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
        info = mlflow.onnx.log_model(onnx_model=onnx.load(str(v.artifact)), name="model",
                                     signature=sig, save_as_external_data=False,
                                     extra_files=extra, pip_requirements=_onnx_requirements(),
                                     metadata={"maas_variant": v.name})
    return info.model_uri


def _onnx_requirements() -> list[str]:
    from bentos.runtimes import pinned

    return pinned(("mlflow", "onnx", "onnxruntime", "tokenizers", "transformers"))
