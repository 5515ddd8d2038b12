"""Logging image models to MLflow and loading them back (never pickle).

- the fp32 model: an MLflow pyfunc logged as code (``pyfunc_model.py``) with the safetensors
  weights, ``maas_nets.py`` and ``maas_variant.json`` as artifacts, a tensor signature and an input
  example; ``mlflow.pyfunc.load_model`` of it predicts on a numpy batch in a fresh process.
- ONNX variants: ``mlflow.onnx`` models (single file) with ``maas_variant.json`` as an extra file.

``maas_variant.json`` (``serving_meta``) is what the service reads: labels, channels, image_size,
runtime, dtype and the variant name.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bentos.runtimes import pinned
from pipelines.families.image_classifier.model import WEIGHTS_FILE, ImageModel, load, save

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
META_FILE = "maas_variant.json"


def serving_meta(model: ImageModel, variant: str = "fp32", runtime: str = "torch",
                 dtype: str = "float32") -> dict[str, Any]:
    return {"variant": variant, "runtime": runtime, "dtype": dtype, "labels": model.labels,
            "channels": model.channels, "image_size": model.image_size,
            "arch": model.spec.get("arch"), "input_names": ["images"], "output_name": "logits"}


def placeholder(model: ImageModel, n: int = 1) -> np.ndarray:
    """A synthetic input batch (mid-grey images): the input example when no data may be logged."""
    s = model.image_size
    return np.full((n, model.channels, s, s), 0.5, dtype=np.float32)


def log_model(model: ImageModel, name: str, input_example: np.ndarray | None = None) -> Any:
    """The fp32 model as a pyfunc (see the module docstring); MLflow's ``ModelInfo``."""
    import mlflow
    from mlflow.models import infer_signature

    from bentos.image_classifier import maas_nets
    from pipelines.families.image_classifier.model import predict_proba

    example = placeholder(model) if input_example is None else np.asarray(input_example,
                                                                           np.float32)
    probs = predict_proba(model, example)
    output = {"label": [model.labels[i] for i in probs.argmax(axis=1)]}
    output.update({label: probs[:, j] for j, label in enumerate(model.labels)})
    import pandas as pd

    signature = infer_signature(example, pd.DataFrame(output))
    with tempfile.TemporaryDirectory(prefix="maas-image-log-") as tmp:
        weights = save(model, Path(tmp))
        meta = Path(tmp) / META_FILE
        meta.write_text(json.dumps(serving_meta(model), indent=2), "utf-8")
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(PYFUNC_CODE),
            artifacts={"weights": str(weights), "nets": maas_nets.__file__, "meta": str(meta)},
            signature=signature, input_example=example,
            pip_requirements=pinned(("mlflow", "torch", "safetensors", "numpy", "pandas")),
            metadata={"labels": model.labels, "maas_image": serving_meta(model)})


def download(model_uri: str, dst: Path) -> Path:
    """The logged model's folder (with ``MLmodel``) under ``dst``."""
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))


def load_logged(model_uri: str) -> ImageModel:
    """The :class:`ImageModel` of a model logged by :func:`log_model`."""
    with tempfile.TemporaryDirectory(prefix="maas-image-load-") as tmp:
        folder = download(model_uri, Path(tmp))
        found = sorted(folder.rglob(WEIGHTS_FILE))
        if not found:
            raise ValueError(f"{model_uri} has no {WEIGHTS_FILE} (not a MaaS image model)")
        return load(found[0])


def log_onnx(onnx_file: Path, meta: dict[str, Any], name: str = "model") -> str:
    """An ONNX variant as an ``mlflow.onnx`` model with ``maas_variant.json``; its model URI."""
    import mlflow
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    s, c = int(meta["image_size"]), int(meta["channels"])
    sig = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, c, s, s), "images")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(meta["labels"])), "logits")]))
    with tempfile.TemporaryDirectory() as tmp:
        extra = Path(tmp) / META_FILE
        extra.write_text(json.dumps(meta, indent=2), "utf-8")
        info = mlflow.onnx.log_model(
            onnx_model=onnx.load(str(onnx_file)), name=name, signature=sig,
            save_as_external_data=False, extra_files=[str(extra)],
            pip_requirements=pinned(("mlflow", "onnx", "onnxruntime", "numpy")),
            metadata={"maas_variant": meta["variant"], "labels": meta["labels"]})
    return info.model_uri
