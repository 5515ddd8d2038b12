"""Logging text embedders to MLflow and loading them back (never pickle).

- the fp32 model: an MLflow pyfunc logged as code (``pyfunc_model.py``) with the encoder folder
  (safetensors, tokenizer, ``maas_embedder.json``) as its artifact; signature: a string column ->
  a float32 tensor ``(-1, dim)``. ``metadata.labels`` names the output columns (``dim_0``, ...),
  ``metadata.maas_embedder`` the pooling, normalisation, max_length and dim.
- ONNX variants: ``mlflow.onnx`` models (single file; pooling and normalisation inside the graph,
  output ``embeddings``) with the tokenizer and ``maas_variant.json`` as extra files.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bentos.runtimes import pinned
from pipelines.families.text_embedder.model import SETTINGS_FILE, EmbedModel, load, save

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
META_FILE = "maas_variant.json"
OUTPUT_NAME = "embeddings"


def output_names(dim: int) -> list[str]:
    return [f"dim_{i}" for i in range(dim)]


def signature(dim: int):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec

    return ModelSignature(inputs=Schema([ColSpec(DataType.string)]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]))


def log_model(model: EmbedModel, name: str, input_example: list[str] | None = None) -> Any:
    """The fp32 model as a pyfunc (see the module docstring); MLflow's ``ModelInfo``."""
    import mlflow

    from validation.pii import PLACEHOLDER_TEXT

    example = list(input_example) if input_example else [PLACEHOLDER_TEXT]
    with tempfile.TemporaryDirectory(prefix="maas-embed-log-") as tmp:
        folder = Path(tmp) / "encoder"
        save(model, folder)
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(PYFUNC_CODE), artifacts={"encoder": str(folder)},
            signature=signature(model.dim), input_example=example,
            pip_requirements=pinned(("mlflow", "torch", "transformers", "tokenizers",
                                           "safetensors", "numpy", "pandas")),
            metadata={"labels": output_names(model.dim), "maas_embedder": model.settings()})


def load_logged(model_uri: str) -> EmbedModel:
    """The :class:`EmbedModel` of a model logged by :func:`log_model`."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="maas-embed-load-") as tmp:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        found = sorted(folder.rglob(SETTINGS_FILE))
        if not found:
            raise ValueError(f"{model_uri} has no {SETTINGS_FILE} (not a MaaS text embedder)")
        return load(found[0].parent)


def log_onnx(onnx_file: Path, model: EmbedModel, variant: str, inputs: list[str]) -> str:
    """An ONNX variant as an ``mlflow.onnx`` model with the tokenizer and ``maas_variant.json``
    (what the service reads); its model URI."""
    import mlflow
    import onnx
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    sig = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.int64), (-1, -1), n) for n in inputs]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, model.dim), OUTPUT_NAME)]))
    meta = {"variant": variant, "runtime": "onnxruntime", "labels": output_names(model.dim),
            "input_names": inputs, "output_name": OUTPUT_NAME, **model.settings()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model.tokenizer.save_pretrained(folder)
        (folder / META_FILE).write_text(json.dumps(meta, indent=2), "utf-8")
        extra = [str(p) for p in sorted(folder.iterdir()) if p.is_file()]
        info = mlflow.onnx.log_model(
            onnx_model=onnx.load(str(onnx_file)), name="model", signature=sig,
            save_as_external_data=False, extra_files=extra,
            pip_requirements=pinned(("mlflow", "onnx", "onnxruntime", "tokenizers",
                                           "numpy")),
            metadata={"maas_variant": variant, "labels": meta["labels"],
                      "maas_embedder": model.settings()})
    return info.model_uri
