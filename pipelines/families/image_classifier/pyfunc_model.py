"""MLflow pyfunc of a MaaS image classifier, logged as code (MLflow "models from code"): this file
is stored with the model as source, so nothing is pickled.

The model's artifacts are ``weights`` (``model.safetensors``, the network spec and labels in its
metadata), ``nets`` (``maas_nets.py``, the network definitions, loaded from the artifact so a
fresh process needs no MaaS install) and ``meta`` (``maas_variant.json``). ``predict`` takes a
float32 numpy batch ``(N, channels, image_size, image_size)`` in [0, 1] and returns a DataFrame:
``label`` (the most probable class) and one probability column per class, in label order.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


def _load_nets(path: str) -> Any:
    name = "maas_nets_logged"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class ImageClassifierModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from safetensors import safe_open

        weights = context.artifacts["weights"]
        with safe_open(weights, framework="pt") as f:
            meta = f.metadata()
        self.spec = json.loads(meta["maas.spec"])
        self.labels = json.loads(meta["maas.labels"])
        self.net = _load_nets(context.artifacts["nets"]).load_net(self.spec, weights)

    def predict(self, context, model_input, params=None):  # noqa: ANN001 (no hints: MLflow
        # would infer a signature from them; the logged one is a tensor signature)
        import numpy as np
        import pandas as pd
        import torch

        batch = np.asarray(model_input, dtype=np.float32)
        with torch.inference_mode():
            probs = torch.softmax(self.net(torch.from_numpy(batch)).float(), dim=-1).numpy()
        out = pd.DataFrame(probs, columns=self.labels)
        out.insert(0, "label", [self.labels[i] for i in probs.argmax(axis=1)])
        return out


mlflow.models.set_model(ImageClassifierModel())
