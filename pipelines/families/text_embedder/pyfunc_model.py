"""MLflow pyfunc of a MaaS text embedder, logged as code (MLflow "models from code"): this file is
stored with the model as source, so nothing is pickled and a fresh process needs no MaaS install.

The model's one artifact, ``encoder``, is a transformers checkpoint folder (safetensors +
tokenizer) with ``maas_embedder.json`` (pooling, normalize, max_length, dim). ``predict`` takes
texts (a list of str, a Series, or a one-column DataFrame) and returns float32 ``(N, dim)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class TextEmbedderModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from transformers import AutoModel, AutoTokenizer

        folder = Path(context.artifacts["encoder"])
        self.settings = json.loads((folder / "maas_embedder.json").read_text("utf-8"))
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.encoder = AutoModel.from_pretrained(folder, use_safetensors=True).eval()

    def predict(self, context, model_input, params=None):  # noqa: ANN001 (no hints: MLflow
        # would infer a signature from them; the logged one says string -> float32 vector)
        import numpy as np
        import torch

        if hasattr(model_input, "columns"):
            model_input = model_input[model_input.columns[0]]
        texts = [str(t) for t in list(model_input)]
        s = self.settings
        out = np.zeros((len(texts), int(s["dim"])), dtype=np.float32)
        for start in range(0, len(texts), 32):
            enc = self.tokenizer(texts[start:start + 32], padding="longest", truncation=True,
                                 max_length=int(s["max_length"]), return_tensors="pt")
            with torch.inference_mode():
                hidden = self.encoder(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            if s["pooling"] == "cls":
                v = hidden[:, 0]
            elif s["pooling"] == "max":
                v = hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).max(1).values
            else:
                v = (hidden * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)
            if s["normalize"]:
                v = torch.nn.functional.normalize(v, dim=-1)
            out[start:start + len(v)] = v.float().numpy()
        return out


mlflow.models.set_model(TextEmbedderModel())
