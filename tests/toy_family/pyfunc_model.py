"""The toy family's MLflow model, logged from code (MLflow's models-from-code: no pickle).

``mlflow.pyfunc.load_model`` runs this file; the weights and labels are the model's artifacts
and ``toy_net.py`` its code path.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class ToyPyfunc(PythonModel):
    def load_context(self, context) -> None:
        from toy_net import load_net

        self.net, self.labels = load_net(context.artifacts["weights"], context.artifacts["labels"])

    def predict(self, context, model_input, params=None):
        import numpy as np
        from toy_net import probabilities

        return np.asarray(probabilities(self.net, model_input[["x1", "x2"]].to_numpy("float32")),
                          dtype=np.float32)


mlflow.models.set_model(ToyPyfunc())
