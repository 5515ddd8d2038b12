"""MLflow pyfunc of an own-module model, logged as code (MLflow "models from code"): this file is
stored with the model as source, so nothing is pickled.

The model's artifact ``model`` is the saved folder (weights, ``maas_module.json``, tokenizer);
its ``code/`` (MLflow ``code_paths``) holds the user's source (``maas_user_module.py``) and
``maas_own_runtime.py``, both loaded by file path, so a fresh process needs neither MaaS nor the
user's folder. ``predict`` takes texts (a list or a one-column DataFrame) or a float32 image
batch and returns a DataFrame: ``label`` and one probability column per class, in label order.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


def _runtime(root: Path) -> Any:
    found = sorted(root.rglob("maas_own_runtime.py"))
    if not found:
        raise FileNotFoundError(f"{root}: no maas_own_runtime.py (logged in code/)")
    name = "maas_own_runtime_logged"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, found[0])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class OwnModuleModel(PythonModel):
    def load_context(self, context: Any) -> None:
        root = Path(context.artifacts["model"]).resolve().parents[1]  # <model>/artifacts/model
        self.predictor = _runtime(root).Predictor(root)

    def predict(self, context, model_input, params=None):  # noqa: ANN001 (no hints: MLflow
        # would infer a signature from them)
        import numpy as np
        import pandas as pd

        if self.predictor.kind == "text":
            if isinstance(model_input, pd.DataFrame):
                model_input = model_input.iloc[:, 0]
            inputs = [str(t) for t in list(model_input)]
        else:
            inputs = np.asarray(model_input, dtype=np.float32)
        probs = self.predictor.proba(inputs)
        labels = self.predictor.labels
        out = pd.DataFrame(probs, columns=labels)
        out.insert(0, "label", [labels[i] for i in probs.argmax(axis=1)])
        return out


mlflow.models.set_model(OwnModuleModel())
