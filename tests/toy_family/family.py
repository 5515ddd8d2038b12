"""ToyTabular: an MLP on two numeric columns (``x1``, ``x2``) of a CSV, as a MaaS model family.

Everything the pipeline needs is here (the contract: ``pipelines/families/base.py``) and in
``service/``; registered by import path only (``model.family: <package>.family:ToyTabular``).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from pipelines.data import DataError, column, normalise_labels, read_frame
from pipelines.families.base import Family

HERE = Path(__file__).resolve().parent
FEATURES = ("x1", "x2")
sys.path.insert(0, str(HERE / "service"))  # toy_net, shared with the service
import toy_net  # noqa: E402


class ToyOptions(BaseModel):
    """``model.options`` of the family."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    hidden: int = Field(16, ge=2, le=256)


class ToyModel:
    def __init__(self, net, labels: list[str]) -> None:
        self.net, self.labels = net, list(labels)


class ToyTrainer:
    """Adam on cross-entropy, shuffled mini-batches, CPU fp32."""

    precision, device = "fp32", "cpu"

    def __init__(self, data, params: dict[str, Any], seed: int, hidden: int) -> None:
        import torch

        torch.manual_seed(seed)
        labels = list(data.id2label.values())
        self.model = ToyModel(toy_net.make_net(len(FEATURES), hidden, len(labels)), labels)
        self.x = torch.tensor(data.train[list(FEATURES)].to_numpy("float32"))
        self.y = torch.tensor(data.ids(data.train))
        self.opt = torch.optim.Adam(self.model.net.parameters(), lr=float(params["learning_rate"]))
        self.batch_size = int(params["batch_size"])
        self.generator = torch.Generator().manual_seed(seed)

    def train_epoch(self, desc: str = "train") -> float:
        import torch

        net, total = self.model.net.train(), 0.0
        order = torch.randperm(len(self.y), generator=self.generator)
        for i in range(0, len(order), self.batch_size):
            idx = order[i:i + self.batch_size]
            loss = torch.nn.functional.cross_entropy(net(self.x[idx]), self.y[idx])
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            total += loss.item() * len(idx)
        net.eval()
        return total / len(self.y)


class ToyTabular(Family):
    input_kind = "row"
    columns = FEATURES
    hyperparameters = {"learning_rate": 0.01, "batch_size": 32}
    service = f"{__package__}.service.service:ToyService"
    runtime = "torch"
    ModelOptions = ToyOptions

    def read(self, path: Path, role: str) -> pd.DataFrame:
        df = read_frame(path, self.cfg.data, role)
        out = pd.DataFrame({c: pd.to_numeric(column(df, c, "columns", path), errors="coerce")
                            for c in FEATURES})
        bad = out.isna().any(axis=1)
        if bad.any():
            raise DataError(f"data.{role}: {path.name} row {int(bad.idxmax()) + 2}: x1/x2 must "
                            "be numbers")
        out["label"] = normalise_labels(column(df, self.cfg.data.label_column, "label_column",
                                               path)).values
        return out

    def inputs(self, rows: pd.DataFrame) -> list[Any]:
        return rows[list(FEATURES)].to_numpy("float32").tolist()

    def profile(self, rows: pd.DataFrame) -> pd.DataFrame:
        return rows[[*FEATURES, "label"]]

    def drift_profile(self, rows: pd.DataFrame, labels: list[str]):
        from validation.drift import profile_data

        bins = [" ".join(f"{c}:{round(v)}" for c, v in zip(FEATURES, r, strict=True))
                for r in rows[list(FEATURES)].itertuples(index=False)]
        return profile_data(bins, labels)  # value bins as the "words"

    def trainer(self, data, params: dict[str, Any], seed: int) -> ToyTrainer:
        return ToyTrainer(data, {**self.hyperparameters, **params}, seed,
                          self.model_options.hidden)

    def predict_proba(self, model: ToyModel, inputs: list[Any], desc: str | None = None):
        return np.asarray(toy_net.probabilities(model.net, inputs), dtype=np.float32)

    def labels(self, model: ToyModel) -> list[str]:
        return model.labels

    def save(self, model: ToyModel, folder: Path) -> None:
        toy_net.save_net(model.net, model.labels, Path(folder))

    def load(self, folder: Path) -> ToyModel:
        return ToyModel(*toy_net.load_net(Path(folder) / toy_net.WEIGHTS,
                                          Path(folder) / toy_net.LABELS))

    def input_example(self, rows: pd.DataFrame) -> pd.DataFrame:
        return rows[list(FEATURES)].head(3).reset_index(drop=True)

    def log_model(self, model: ToyModel, name: str, input_example: Any | None = None):
        import mlflow
        from mlflow.models import infer_signature

        from bentos.runtimes import pinned

        example = input_example if input_example is not None else pd.DataFrame(
            [[0.0, 0.0]], columns=list(FEATURES))
        probs = self.predict_proba(model, example.to_numpy("float32").tolist())
        with tempfile.TemporaryDirectory() as tmp:
            self.save(model, Path(tmp))
            return mlflow.pyfunc.log_model(
                name=name, python_model=str(HERE / "pyfunc_model.py"),
                artifacts={"weights": os.path.join(tmp, toy_net.WEIGHTS),
                           "labels": os.path.join(tmp, toy_net.LABELS)},
                code_paths=[str(HERE / "service" / "toy_net.py")],
                signature=infer_signature(example, probs), input_example=example,
                metadata={"labels": model.labels},
                pip_requirements=pinned(("mlflow", "torch", "safetensors", "pandas")))

    def load_logged(self, model_uri: str) -> ToyModel:
        import mlflow

        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri,
                                                              dst_path=tmp))
            return self.load(folder / "artifacts")
