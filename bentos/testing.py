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

    from bentos.build import CONFIG_FILENAME, SERVICE_MODULE, bentoml_store_scope

    with bentoml_store_scope(), tempfile.TemporaryDirectory(prefix="maas-svc-") as tmp:
        src = Path(bentoml.bentos.get(bento_tag).path) / "src"
        shutil.copy2(src / f"{SERVICE_MODULE}.py", Path(tmp) / f"{SERVICE_MODULE}.py")
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
            sys.modules.pop(name, None)
