"""The text embedding family: a pre-trained encoder (``model.checkpoint``, resolved as the text
classifier does: a folder or ``package:<module>``) with a pooling head, served as vectors.

Training is optional: ``epochs: 0`` (a hyperparameter) serves the encoder as it is; otherwise a
contrastive fine-tune with in-batch negatives on the labelled texts (``train.py``). Scores are
same-label retrieval of the scored rows against the training split as the index
(``retrieval.py``): ``knn_accuracy`` (also reported as ``accuracy``, with the kNN votes' macro
F1/precision/recall, so registry tags, drift and the confusion matrix read the kNN predictions),
``recall_at_k`` and ``precision_at_k``. Variants: ``onnx``, ``onnx-int8`` (``variants.py``), gated
on mean cosine with fp32 besides the metric budget. Served by ``bentos/text_embedder/``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipelines.evaluation import METRICS
from pipelines.families.base import Family, FamilyError
from pipelines.families.text_embedder import retrieval
from pipelines.families.text_embedder.model import POOLINGS, EmbedModel, embed
from pipelines.families.text_embedder.pairs import embed_pairs, is_pairs, read_pairs, scores
from pipelines.families.text_embedder.train import HYPERPARAMETERS, ContrastiveTrainer


class EmbedderOptions(BaseModel):
    """``model.options`` of the text embedder."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    normalize: bool = Field(True, description="L2-normalise every embedding")
    k: int = Field(10, ge=1, le=1000, description="neighbours of the kNN vote and recall@k")
    pooling: Literal["mean", "cls", "max"] = Field(
        "mean", description="pooling when the tuning does not set the `pooling` hyperparameter")


class EmbedderData(BaseModel):
    """``data.options`` of the text embedder: labelled texts (default) or scored pairs."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    pair_column: str | int | None = Field(
        None, description="the second text column: rows are pairs (text_column, pair_column) "
                          "and label_column their similarity score (higher: more similar)")
    positive_score: float | None = Field(
        None, description="pairs with a score >= this train as positives (None: every pair)")


class TextEmbedder(Family):
    """Embeds texts with ``model.checkpoint``'s encoder; optionally fine-tuned contrastively."""

    input_kind = "text"
    columns = ("text",)
    hyperparameters = HYPERPARAMETERS
    service = "bentos.text_embedder.service:TextEmbedder"
    runtime = "torch"
    variants = ("onnx", "onnx-int8")
    ModelOptions = EmbedderOptions
    DataOptions = EmbedderData
    metric_names = (*retrieval.METRIC_NAMES, "spearman", *METRICS)
    variant_floors = {"mean_cosine_vs_fp32": 0.99}

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        # the training split embedded by the last model state scored: (stamp, split, rows); the
        # split itself is kept, so another split (even of the same file) never reuses it
        self._index: tuple[str, Any, np.ndarray] | None = None

    # -- data ---------------------------------------------------------------------------------
    def read(self, path: Path, role: str):
        from pipelines.data import read_table

        if self.pairs:
            return read_pairs(path, self.cfg.data, role, self.data_options.pair_column)
        return read_table(path, self.cfg.data, role)

    @property
    def pairs(self) -> bool:
        """Whether rows are scored pairs (``data.options.pair_column``) or labelled texts."""
        return self.data_options.pair_column is not None

    def inputs(self, rows) -> list[Any]:
        """Texts, or ``(text, text_b)`` tuples of pair rows."""
        if self.pairs:
            return list(zip(rows.text.tolist(), rows.text_b.tolist(), strict=True))
        return rows.text.tolist()

    def profile(self, rows):
        return rows[["text", "text_b", "label"] if self.pairs else ["text", "label"]]

    def drift_profile(self, rows, labels: list[str]):
        from pipelines.drift_step import SALT_ENV
        from validation.drift import profile_data

        texts = (rows.text + " " + rows.text_b) if self.pairs else rows.text
        return profile_data(texts.tolist(), labels, salt=os.environ.get(SALT_ENV, ""))

    def describe(self, rows) -> list[Any]:
        from validation.pii import scrub

        return scrub(rows.text.tolist(), self.cfg.privacy.log_text)

    def input_example(self, rows) -> list[str]:
        from validation.pii import loggable_texts

        return loggable_texts(rows.text.tolist(), self.cfg.privacy.log_text, n=3)

    # -- model --------------------------------------------------------------------------------
    @property
    def checkpoint(self) -> Path:
        from pipelines.families.text_classifier_model import resolve_checkpoint

        return resolve_checkpoint(self.cfg.model.checkpoint)

    def check(self) -> None:
        self.checkpoint  # noqa: B018 - raises CheckpointError before any work
        tuning = self.cfg.tuning
        spec = tuning.search_space.get("pooling")
        asked = [tuning.fixed["pooling"]] if "pooling" in tuning.fixed else []
        asked += list(getattr(spec, "choices", None) or [])
        if spec is not None and not hasattr(spec, "choices"):
            raise FamilyError("tuning.search_space.pooling: a categorical of "
                              f"{list(POOLINGS)}")
        bad = [p for p in asked if p not in POOLINGS]
        if bad:
            raise FamilyError(f"tuning pooling {bad[0]!r}: one of {list(POOLINGS)}")

    def trainer(self, data, params: dict[str, Any], seed: int) -> ContrastiveTrainer:
        params = {"pooling": self.model_options.pooling, **params}
        rows, ids = data.train, data.ids(data.train)
        if self.pairs:  # the positive pairs; each batch's other pairs are its negatives
            floor = self.data_options.positive_score
            rows = rows if floor is None else rows[rows.label >= floor]
            ids = [0] * len(rows)
        return ContrastiveTrainer(
            self.checkpoint, params, self.inputs(rows), ids,
            self.cfg.model.max_length, self.model_options.normalize, seed=seed,
            max_epochs=self.cfg.tuning.max_epochs)

    def base_model(self) -> EmbedModel:
        """The pre-trained encoder with this pipeline's pooling head (no training)."""
        from pipelines.families.text_embedder.model import load_encoder

        tokenizer, encoder = load_encoder(self.checkpoint)
        return EmbedModel(encoder, tokenizer, self.model_options.pooling,
                          self.model_options.normalize, self.cfg.model.max_length)

    def predict_proba(self, model: EmbedModel, inputs: list[str], desc: str | None = None):
        """The embeddings (float32, one row per text; a pair's two side by side): this family's
        outputs."""
        def run(texts: list[str]) -> np.ndarray:
            return embed(model, texts, self.cfg.model.eval_batch_size, desc=desc)

        return embed_pairs(run, inputs) if is_pairs(inputs) else run(inputs)

    def labels(self, model: EmbedModel) -> list[str]:
        from pipelines.families.text_embedder.tracking import output_names

        return output_names(model.dim)

    def metrics(self, truth: list[str], probs: np.ndarray, model: EmbedModel,
                labels: list[str], *, data):
        """Retrieval of the rows embedded in ``probs`` against the training split embedded by
        ``model`` (computed once per model state)."""
        from pipelines.evaluation import evaluate_predictions

        if self.pairs:
            return _pair_evaluation(truth, probs)
        found = retrieval.knn(probs, truth, *self.index(model, data), k=self.model_options.k)
        onehot = np.zeros((len(truth), len(labels) or 1), dtype=np.float32)
        pos = {lab: i for i, lab in enumerate(labels)}
        for row, (lab, conf) in enumerate(zip(found.predicted, found.confidence, strict=True)):
            onehot[row, pos.get(lab, 0)] = conf
        ev = evaluate_predictions(truth, onehot, list(labels), list(labels))
        ev.metrics.update(found.metrics)
        ev.confidences[:] = found.confidence
        return ev

    def index(self, model: EmbedModel, data) -> tuple[np.ndarray, list[str]]:
        """The retrieval index of every score: ``data``'s training split (labelled texts)
        embedded by ``model``, computed once per model state and split."""
        cached = self._index
        if cached is None or cached[0] != model.stamp or cached[1] is not data:
            self._index = cached = (model.stamp, data, embed(model, data.train.text.tolist(),
                                                             self.cfg.model.eval_batch_size))
        return cached[2], data.names(data.train)

    def agreement(self, outputs: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        return retrieval.agreement(outputs, reference)

    # -- MLflow -------------------------------------------------------------------------------
    def save(self, model: EmbedModel, folder: Path) -> None:
        from pipelines.families.text_embedder.model import save

        save(model, folder)

    def load(self, folder: Path) -> EmbedModel:
        from pipelines.families.text_embedder.model import load

        return load(folder)

    def log_model(self, model: EmbedModel, name: str, input_example: Any | None = None):
        from pipelines.families.text_embedder.tracking import log_model

        return log_model(model, name, input_example)

    def load_logged(self, model_uri: str) -> EmbedModel:
        from pipelines.families.text_embedder.tracking import load_logged

        return load_logged(model_uri)

    # -- compression and card -----------------------------------------------------------------
    def compressor(self, model: EmbedModel, data, workdir: Path):
        from pipelines.families.text_embedder.variants import EmbedCompressor

        return EmbedCompressor(self.cfg, data, model, workdir)

    def card_facts(self) -> dict[str, Any]:
        from pipelines.families.text_classifier import checkpoint_facts

        facts = checkpoint_facts(self.cfg.model.checkpoint, self.cfg.model.max_length,
                                 self.checkpoint)
        tuned = "pooling" in self.cfg.tuning.search_space
        pooling = ("tuned (see the best trial's pooling)" if tuned else
                   self.cfg.tuning.fixed.get("pooling", self.model_options.pooling))
        facts["details"] = {"task": "text embedding", "pooling": pooling,
                            "dim": _hidden_size(self.checkpoint),
                            "normalized": self.model_options.normalize,
                            "evaluation": "Spearman of pair cosine vs score" if self.pairs else
                            f"kNN (k={self.model_options.k}) of the test split against the "
                            "training split"}
        return facts


def _pair_evaluation(truth: list[str], outputs: np.ndarray):
    """Spearman of the pairs' cosine with their scores, and the binary view (``pairs.py``)."""
    from pipelines.evaluation import evaluate_predictions

    metrics, true, pred, conf = scores(truth, outputs)
    names = ["dissimilar", "similar"]
    onehot = np.array([[0.0, 1.0] if p == "similar" else [1.0, 0.0] for p in pred], np.float32)
    ev = evaluate_predictions(true, onehot, names, names)
    ev.metrics.update(metrics)
    ev.confidences[:] = conf  # the pair's cosine mapped to [0, 1]
    return ev


def _hidden_size(folder: Path) -> int | None:
    import json

    return json.loads((folder / "config.json").read_text("utf-8")).get("hidden_size")
