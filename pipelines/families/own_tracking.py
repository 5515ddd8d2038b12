"""Logging own-module models to MLflow and loading them back (never pickle).

A pyfunc logged as code (``own_pyfunc.py``) with the saved model folder as its artifact and the
user's source + ``own_runtime.py`` as ``code_paths`` (``code/maas_user_module.py``,
``code/maas_own_runtime.py``), so ``mlflow.pyfunc.load_model`` works in a fresh process from any
working directory. The model's metadata carries ``labels`` and ``maas_module`` (class, source
file and sha256, constructor kwargs); the active run gets the same as ``maas.module*`` tags
(lineage).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.families import own_model as om
from pipelines.families import own_runtime as rt

PYFUNC_CODE = Path(__file__).with_name("own_pyfunc.py")
RUNTIME_CODE = Path(__file__).with_name("own_runtime.py")


def lineage(model: om.OwnModel) -> dict[str, Any]:
    m = model.meta
    return {"class": m["class"], "module_file": m["module_file"],
            "module_sha256": m["module_sha256"], "init": m["init"], "kind": m["kind"]}


def _example(model: om.OwnModel, input_example: Any | None) -> Any:
    if model.meta["kind"] == "text":
        return list(input_example) if input_example else ["an example text"]
    if input_example is not None:
        return np.asarray(input_example, np.float32)
    c, s = int(model.meta["in_channels"]), int(model.meta["image_size"])
    return np.full((1, c, s, s), 0.5, dtype=np.float32)


def image_meta(model: om.OwnModel) -> dict[str, Any]:
    """The image service's ``maas_variant.json`` of an own image module (torch, fp32)."""
    m = model.meta
    return {"variant": "fp32", "runtime": "torch", "dtype": "float32", "labels": model.labels,
            "channels": int(m["in_channels"]), "image_size": int(m["image_size"]),
            "arch": f"module:{m['class']}", "input_names": ["images"], "output_name": "logits"}


def log_model(model: om.OwnModel, name: str, input_example: Any | None = None) -> Any:
    """The model as a pyfunc (see the module docstring); MLflow's ``ModelInfo``."""
    import mlflow
    import pandas as pd
    from mlflow.models import infer_signature

    from pipelines.families.text_classifier_model import serving_requirements

    example = _example(model, input_example)
    probs = om.predict_proba(model, list(example) if model.meta["kind"] == "text" else example)
    out = pd.DataFrame(probs, columns=model.labels)
    out.insert(0, "label", [model.labels[i] for i in probs.argmax(axis=1)])
    with tempfile.TemporaryDirectory(prefix="maas-own-log-") as tmp:
        folder, code = Path(tmp) / "model", Path(tmp) / "code"
        om.save(model, folder)
        code.mkdir()
        (code / rt.MODULE_FILE).write_bytes(model.source)
        shutil.copyfile(RUNTIME_CODE, code / "maas_own_runtime.py")
        (folder / rt.MODULE_FILE).unlink()  # the source travels once, in code/
        if model.meta["kind"] == "image":  # what the image service reads (maas_runtime.py)
            (folder / "maas_variant.json").write_text(json.dumps(image_meta(model)), "utf-8")
        info = mlflow.pyfunc.log_model(
            name=name, python_model=str(PYFUNC_CODE), artifacts={"model": str(folder)},
            code_paths=[str(code / rt.MODULE_FILE), str(code / "maas_own_runtime.py")],
            signature=infer_signature(example, out), input_example=example,
            pip_requirements=serving_requirements(),
            metadata={"labels": model.labels, "maas_module": lineage(model)})
    mlflow.set_tags({"maas.module": f"{model.meta['module_file']}:{model.meta['class']}",
                     "maas.module_sha256": model.meta["module_sha256"],
                     "maas.module_init": json.dumps(model.meta["init"], sort_keys=True)})
    return info


def is_own(model_uri: str) -> bool:
    """Whether ``model_uri`` was logged by :func:`log_model` (its metadata has
    ``maas_module``): a champion may be an own module while this run fine-tunes a checkpoint,
    or the other way round."""
    from mlflow.models import get_model_info

    return "maas_module" in (get_model_info(model_uri).metadata or {})


def load_logged(model_uri: str) -> om.OwnModel:
    """The :class:`OwnModel` of a model logged by :func:`log_model`."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="maas-own-load-") as tmp:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        return om.load(root)
