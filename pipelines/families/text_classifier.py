"""Text classification family: a pre-trained BERT-style encoder fine-tuned with a new head.

The :class:`TextClassifier` family (the contract: ``base.py``) over the transformers helpers in
``text_classifier_model.py`` (training, prediction, MLflow transformers flavour) and the
compression variants in ``text_classifier_variants.py`` (ONNX export + fusion, int8, pruning).
Rows have one column, ``text``, read from ``data.text_column`` / ``data.label_column`` of a
CSV/TSV/Parquet/JSONL file. Served by ``bentos/text_classifier/``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from pipelines.families.base import Family
from pipelines.families.text_classifier_init import init_settings
from pipelines.families.text_classifier_model import (  # noqa: F401 - the module's old surface
    HYPERPARAMETERS,
    CheckpointError,
    Trainer,
    _autocast,
    adamw,
    amp_dtype,
    labels_of,
    load,
    load_for_training,
    load_logged,
    log_model,
    precision_name,
    predict_proba,
    resolve_checkpoint,
    save,
    serving_requirements,
)
from pipelines.families.text_classifier_own import OwnText


@dataclass(frozen=True)
class TextModel:
    """The family's model: a transformers sequence classifier and its tokenizer."""

    model: Any
    tokenizer: Any


class _EpochTrainer:
    """:class:`Trainer` seen through the contract (``.model`` is a :class:`TextModel`)."""

    def __init__(self, trainer: Trainer) -> None:
        self._t = trainer
        self.precision, self.device = trainer.precision, trainer.device

    @property
    def model(self) -> TextModel:
        return TextModel(self._t.model, self._t.tokenizer)

    def train_epoch(self, desc: str = "train") -> float:
        return self._t.train_epoch(desc)


class TextClassifier(Family):
    """Fine-tunes ``model.checkpoint`` (a folder or ``package:<module>``) on labelled texts, or
    trains the user's own module (``model.module``) from scratch."""

    input_kind = "text"
    columns = ("text",)
    hyperparameters = HYPERPARAMETERS
    service = "bentos.text_classifier.service:TextClassifier"
    runtime = "torch"
    variants = ("onnx", "onnx-int8", "pruned", "pruned+onnx", "pruned+onnx-int8",
                "distilled", "distilled+onnx", "distilled+onnx-int8")
    #: pruning is opt-in (over the 1-point budget on MiniLM: docs/compression.md); the
    #: distilled student is made when it fits compression.distillation.time_budget_s
    default_variants = ("onnx", "onnx-int8", "distilled", "distilled+onnx-int8")
    init_settings = staticmethod(init_settings)  # `maas init`: text_classifier_init.py

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        # `model.module`: the user's own nn.Module, trained from scratch (text_classifier_own.py)
        self.own = OwnText(cfg) if cfg.model.module else None

    # -- data ---------------------------------------------------------------------------------
    def read(self, path: Path, role: str):
        from pipelines.data import read_table

        return read_table(path, self.cfg.data, role)

    def inputs(self, rows) -> list[str]:
        return rows.text.tolist()

    def profile(self, rows):
        return rows[["text", "label"]]

    def drift_profile(self, rows, labels: list[str]):
        from pipelines.drift_step import SALT_ENV
        from validation.drift import profile_data

        return profile_data(rows.text.tolist(), labels, salt=os.environ.get(SALT_ENV, ""))

    def describe(self, rows) -> list[Any]:
        from validation.pii import scrub

        return scrub(rows.text.tolist(), self.cfg.privacy.log_text)

    def input_example(self, rows) -> list[str]:
        from validation.pii import loggable_texts

        return loggable_texts(rows.text.tolist(), self.cfg.privacy.log_text, n=3)

    # -- model --------------------------------------------------------------------------------
    @property
    def checkpoint(self) -> Path:
        """The resolved checkpoint folder (CheckpointError when it is missing or unreadable)."""
        return resolve_checkpoint(self.cfg.model.checkpoint)

    def check(self) -> None:
        if self.own:
            return self.own.check()
        self.checkpoint  # noqa: B018 - raises CheckpointError before any work

    def trainer(self, data, params: dict[str, Any], seed: int):
        if self.own:
            return self.own.trainer(data, params, seed)
        return _EpochTrainer(Trainer(
            self.checkpoint, data.id2label, params, self.inputs(data.train), data.ids(data.train),
            self.cfg.model.max_length, seed=seed, epochs=self.cfg.tuning.max_epochs))

    def predict_proba(self, model: TextModel, inputs: list[str], desc: str | None = None):
        if not isinstance(model, TextModel):  # an own module's (this run's or a champion's)
            return own_predict(model, inputs, self.cfg.model.eval_batch_size)
        return predict_proba(model.model, model.tokenizer, inputs, self.cfg.model.max_length,
                             self.cfg.model.eval_batch_size, desc=desc)

    def labels(self, model: TextModel) -> list[str]:
        if not isinstance(model, TextModel):
            return model.labels
        return labels_of(model.model)

    # -- MLflow -------------------------------------------------------------------------------
    def save(self, model: TextModel, folder: Path) -> None:
        if self.own:
            return self.own.save(model, folder)
        save(model.model, model.tokenizer, folder)

    def load(self, folder: Path) -> TextModel:
        if self.own:
            return self.own.load(folder)
        return TextModel(*load(folder))

    def log_model(self, model: TextModel, name: str, input_example: Any | None = None):
        if self.own:
            return self.own.log_model(model, name, input_example)
        return log_model(model.model, model.tokenizer, name, input_example)

    def load_logged(self, model_uri: str) -> TextModel:
        from pipelines.families.own_tracking import is_own
        from pipelines.families.own_tracking import load_logged as load_own

        if is_own(model_uri):  # by what was logged: the champion may be of the other kind
            return load_own(model_uri)
        return TextModel(*load_logged(model_uri))

    # -- compression and card -----------------------------------------------------------------
    def compressor(self, model: TextModel, data, workdir: Path):
        if self.own:
            return self.own.compressor(model, workdir)
        from pipelines.families.text_classifier_variants import TextCompressor

        return TextCompressor(self.cfg, data, model.model, model.tokenizer, workdir)

    def card_facts(self) -> dict[str, Any]:
        if self.own:
            return self.own.card_facts()
        return checkpoint_facts(self.cfg.model.checkpoint, self.cfg.model.max_length,
                                self.checkpoint)


def checkpoint_facts(spec: str, max_length: int, path: Path) -> dict[str, Any]:
    """The card's ``base_checkpoint`` facts of a transformers checkpoint (``spec`` as configured,
    ``path`` its resolved folder): package and version, architecture, weights sha256."""
    from pipelines.card_facts import sha256_file

    out: dict[str, Any] = {"spec": spec, "max_length": max_length}
    if spec.startswith("package:"):
        package = spec.split(":", 1)[1]
        out["package"] = package
        try:
            out["package_version"] = metadata.version(package.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out["package_version"] = None
    with open(path / "config.json", encoding="utf-8") as fh:
        config = json.load(fh)
    out["architecture"] = (", ".join(config.get("architectures") or [])
                           or config.get("model_type"))
    weights = sorted(path.glob("*.safetensors"))
    out["weights_sha256"] = sha256_file(weights[0]) if len(weights) == 1 else None
    return out


def own_predict(model: Any, inputs: list[str], batch_size: int):
    """Probabilities of an own-module model (``own_model.OwnModel``)."""
    from pipelines.families.own_model import predict_proba as own_proba

    return own_proba(model, inputs, batch_size)
