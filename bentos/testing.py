"""Helpers for tests and benchmarks: log a transformers text classifier the way the pipeline does
(``mlflow.transformers.log_model`` with model + tokenizer, safetensors), register it and point an
alias at it. Needs ``MLFLOW_TRACKING_URI`` (or ``mlflow.set_tracking_uri``) set by the caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LABELS = ("negative", "positive")


def load_classifier(checkpoint: str | Path, labels: tuple[str, ...] = LABELS):
    """(model, tokenizer) from a local checkpoint folder, with the label map set."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    id2label = dict(enumerate(labels))
    model = AutoModelForSequenceClassification.from_pretrained(
        checkpoint, num_labels=len(labels), id2label=id2label,
        label2id={v: k for k, v in id2label.items()})
    return model, AutoTokenizer.from_pretrained(checkpoint)


def register_classifier(model: Any, tokenizer: Any, name: str, alias: str = "champion") -> str:
    """Log, register and alias; returns the registered version."""
    import mlflow
    from mlflow import MlflowClient

    with mlflow.start_run():
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer}, name="model",
            task="text-classification",
            # explicit requirements: the inferred ones import torchvision, which MaaS lacks
            pip_requirements=["torch", "transformers"],
        )
    mv = mlflow.register_model(info.model_uri, name)
    MlflowClient().set_registered_model_alias(name, alias, mv.version)
    return str(mv.version)


def load_service(bento_tag: str, **overrides: Any):
    """Instantiate the ``TextClassifier`` of bento ``bento_tag`` in this process (for in-process
    measurements and tests), with ``overrides`` applied to its settings (e.g. ``quantize=True``).
    Returns ``(module, instance)``; ``instance.predict_texts(texts)`` is one model call. On CPU
    this sets torch's process-wide thread count, as the service does in its worker."""
    import importlib.util
    import json
    import shutil
    import sys
    import tempfile
    import uuid

    import bentoml

    from bentos.build import (
        CONFIG_FILENAME,
        SERVICE_MODULE,
        bentoml_store_scope,
    )

    with bentoml_store_scope(), tempfile.TemporaryDirectory(prefix="maas-svc-") as tmp:
        src = Path(bentoml.bentos.get(bento_tag).path) / "src"
        # every module the bento's service loads from its folder (maas_runtime, maas_guard,
        # maas_http, maas_machine where the bento has it, ...)
        siblings = sorted(p.stem for p in src.glob("*.py") if p.stem != SERVICE_MODULE)
        for module in (SERVICE_MODULE, *siblings):
            shutil.copy2(src / f"{module}.py", Path(tmp) / f"{module}.py")
        config = json.loads((src / CONFIG_FILENAME).read_text("utf-8"))
        config["settings"].update(overrides)
        (Path(tmp) / CONFIG_FILENAME).write_text(json.dumps(config), "utf-8")
        name = f"maas_service_{uuid.uuid4().hex[:12]}"
        spec = importlib.util.spec_from_file_location(name, Path(tmp) / f"{SERVICE_MODULE}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)  # reads bento_config.json now, at import
            return module, module.TextClassifier()
        finally:
            for key in [name, *(f"{name}_{m}" for m in siblings)]:
                sys.modules.pop(key, None)


# -- compression variants (the layout the pipeline's variant step writes) --------------------
def export_onnx(model: Any, tokenizer: Any, path: str | Path) -> Path:
    """``model`` (a transformers sequence classifier) as a single-file ONNX graph with dynamic
    batch and sequence axes, inputs ``input_ids``, ``attention_mask``, ``token_type_ids``."""
    import torch

    names = ["input_ids", "attention_mask", "token_type_ids"]
    enc = tokenizer(["a first example", "and a second, longer one"], padding=True,
                    return_tensors="pt", return_token_type_ids=True)
    model = model.eval()
    with torch.no_grad():
        torch.onnx.export(model, tuple(enc[n] for n in names), str(path), input_names=names,
                          output_names=["logits"],
                          dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names},
                                        "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return Path(path)


def quantize_int8(src: str | Path, dst: str | Path, per_channel: bool = True) -> Path:
    """Dynamic int8 quantisation of an ONNX graph (ONNX Runtime)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)
    return Path(dst)


def log_onnx_variant(onnx_path: str | Path, tokenizer: Any, variant: str,
                     labels: tuple[str, ...] | list[str] = LABELS,
                     max_length: int = 64) -> tuple[str, str]:
    """Log ``onnx_path`` with ``mlflow.onnx`` (one file, no external data) in a child run of the
    active run (or a new run), with the tokenizer files and ``maas_variant.json`` as extra files.
    Returns ``(model_uri, run_id)``."""
    import json
    import tempfile

    import mlflow
    import onnx

    with tempfile.TemporaryDirectory(prefix="maas-variant-") as tmp:
        tok_dir = Path(tmp) / "tok"
        tokenizer.save_pretrained(tok_dir)
        meta = Path(tmp) / "maas_variant.json"
        meta.write_text(json.dumps({
            "variant": variant, "runtime": "onnxruntime", "labels": list(labels),
            "max_length": max_length,
            "input_names": ["input_ids", "attention_mask", "token_type_ids"],
            "output_name": "logits"}), "utf-8")
        extra = [str(p) for p in sorted(tok_dir.iterdir())] + [str(meta)]
        with mlflow.start_run(run_name=f"variant-{variant}",
                              nested=mlflow.active_run() is not None) as run:
            info = mlflow.onnx.log_model(onnx_model=onnx.load(str(onnx_path)), name="model",
                                         save_as_external_data=False, extra_files=extra,
                                         pip_requirements=["onnxruntime"])
    return info.model_uri, run.info.run_id


def set_variants(name: str, version: str, variants: dict[str, dict[str, Any]],
                 chosen: str | None) -> None:
    """Write the ``maas.variants`` (JSON) and ``maas.variant`` tags on ``models:/name/version``
    (``chosen`` None leaves ``maas.variant`` unset, as on versions from before variants)."""
    import json

    from mlflow import MlflowClient

    client = MlflowClient()
    client.set_model_version_tag(name, version, "maas.variants", json.dumps(variants))
    if chosen is not None:
        client.set_model_version_tag(name, version, "maas.variant", chosen)


def variant_entry(runtime: str, model_uri: str, run_id: str, *, accuracy: float = 0.8,
                  accuracy_drop: float = 0.0, max_accuracy_drop: float = 0.01,
                  texts_per_s: float = 0.0, within_budget: bool | None = None) -> dict[str, Any]:
    """One entry of the ``maas.variants`` tag."""
    ok = accuracy_drop <= max_accuracy_drop if within_budget is None else within_budget
    return {"runtime": runtime, "model_uri": model_uri, "run_id": run_id, "within_budget": ok,
            "accuracy": accuracy, "accuracy_drop": accuracy_drop,
            "max_accuracy_drop": max_accuracy_drop, "texts_per_s": texts_per_s}


def add_onnx_variants(name: str, version: str, model: Any, tokenizer: Any, workdir: str | Path,
                      *, chosen: str | None = "onnx", int8_drop: float = 0.005,
                      max_accuracy_drop: float = 0.01) -> dict[str, dict[str, Any]]:
    """Make ``onnx`` (fp32 graph) and ``onnx-int8`` (dynamic int8) variants of ``model``, log
    each in its own run and tag version ``version`` with them (plus ``fp32``). The accuracy
    figures are placeholders (``int8_drop`` for the int8 one) for tests; returns the table."""
    from mlflow import MlflowClient

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fp32_path = export_onnx(model, tokenizer, workdir / "fp32.onnx")
    int8_path = quantize_int8(fp32_path, workdir / "int8.onnx")
    mv = MlflowClient().get_model_version(name, version)
    labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    table = {"fp32": variant_entry("torch", f"models:/{mv.model_id}" if getattr(
        mv, "model_id", None) else f"models:/{name}/{version}", mv.run_id, accuracy=0.8,
        max_accuracy_drop=max_accuracy_drop)}
    for variant, path, drop in (("onnx", fp32_path, 0.0), ("onnx-int8", int8_path, int8_drop)):
        uri, run_id = log_onnx_variant(path, tokenizer, variant, labels)
        table[variant] = variant_entry("onnxruntime", uri, run_id, accuracy=0.8 - drop,
                                       accuracy_drop=drop, max_accuracy_drop=max_accuracy_drop)
    set_variants(name, version, table, chosen)
    return table


def serve_registered(store: dict[str, Any], model_name: str, settings: Any, log_name: str):
    """Build ``models:/<model_name>@champion`` of a test store ({"uri", "home", "root"}) with
    ``settings`` and return the (not yet entered) ``serve_bento`` context for it."""
    import os
    from unittest import mock

    import mlflow

    from bentos.build import build_bento
    from bentos.server import serve_bento

    env = {"MLFLOW_TRACKING_URI": store["uri"], "BENTOML_HOME": str(store["home"])}
    with mock.patch.dict(os.environ, env):  # restored as it was, whatever the build does
        mlflow.set_tracking_uri(store["uri"])
        built = build_bento(f"models:/{model_name}@champion", settings)
    return serve_bento(built.bento_tag, bentoml_home=store["home"],
                       log_path=Path(store["root"]) / log_name)
