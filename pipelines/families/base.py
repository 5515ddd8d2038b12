"""The model-family contract: what the pipeline asks of a family, and nothing more.

A family is a subclass of :class:`Family` in one module (registered in
``pipelines/families/__init__.py:FAMILIES``, or named by import path in ``model.family``), plus a
BentoML service folder. The pipeline creates one instance per run, ``Family(cfg)``, and calls only
the members below; ``cfg`` is the whole :class:`pipelines.config.PipelineConfig`, and the family's
own settings arrive validated as ``self.model_options`` / ``self.data_options`` (from the pipeline
file's ``model.options:`` / ``data.options:``, schemas :attr:`Family.ModelOptions` /
:attr:`Family.DataOptions`).

Vocabulary: *rows* is a ``pandas.DataFrame`` with the family's :attr:`~Family.columns` and
``label`` (label values as read: str or int); *inputs* is what the model consumes for those rows,
``self.inputs(rows)`` (a list: texts, image arrays, feature vectors); *model* is the family's
fitted-model object, opaque to the pipeline (it only passes it back to the family).

*Outputs* are what :meth:`Family.predict_proba` returns: one float row per input. For a classifier
they are softmax probabilities; another family defines its own (the text embedder's are embedding
vectors) and then also defines what reads them: :meth:`Family.metrics` (the scores, under the
names in :attr:`Family.metric_names`) and :meth:`Family.agreement` (how close a compression
variant's outputs are to fp32's, with :attr:`Family.variant_floors` as the servable minimum).
Every metric is higher-is-better; the ``Evaluation`` a family returns always carries
``accuracy``, ``f1_macro``, ``precision_macro`` and ``recall_macro`` (the registry's tags, the
run summary) plus per-row predicted labels and confidences (drift, examples, confusion matrix).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from pipelines.evaluation import METRICS

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from pipelines.config import PipelineConfig
    from pipelines.data import Dataset
    from pipelines.evaluation import Evaluation


class FamilyError(ValueError):
    """A family's settings or starting weights cannot be used (bad config: exit 2); the message
    names the field. Bad data is ``pipelines.data.DataError`` (exit 3)."""


class NoOptions(BaseModel):
    """A family without options of its own: ``model.options`` / ``data.options`` must be empty."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Trainer(Protocol):
    """One training run of one trial (made by :meth:`Family.trainer`)."""

    model: Any        # the fitted model so far (what predict_proba/save/log_model take)
    precision: str    # "fp32" | "bf16" | "fp16": what the forward pass runs in
    device: Any       # where it trains (str or torch.device), for the log

    def train_epoch(self, desc: str = "train") -> float:
        """One pass over the training rows; returns the mean training loss."""


class Classifier(Protocol):
    """A servable model of one variant: what compression measures (pipelines/variant_speed.py)."""

    runtime: str      # a key of bentos.runtimes.RUNTIMES ("torch", "onnxruntime")

    def predict_proba(self, inputs: list[Any]) -> np.ndarray:
        """The family's outputs, one row per input (a classifier's: softmax probabilities,
        columns in the model's label order)."""


@dataclass
class BuiltVariant:
    """One compression variant as a family builds it (:meth:`Compressor.build`)."""

    name: str                 # e.g. "onnx", "onnx-int8", "pruned-30"
    runtime: str              # a key of bentos.runtimes.RUNTIMES
    clf: Classifier           # runs it the way the bento will
    params: int = 0           # parameter count
    size_mb: float = 0.0      # size of its weight files
    settings: dict[str, Any] = field(default_factory=dict)  # logged as the child run's params
    artifact: Any = None      # what Compressor.log needs (a torch model, an ONNX file path)


class Compressor(Protocol):
    """Builds a family's compression variants of one tuned model (:meth:`Family.compressor`)."""

    threads: int              # CPU threads the variants are measured with

    def build(self, name: str) -> BuiltVariant:
        """The variant ``name``: "fp32" (the reference: the tuned model as it is served) or one
        of :attr:`Family.variants` that ``cfg.compression.variants`` lists. Raises if it cannot
        be built (the pipeline then records it as skipped, with the error)."""

    def log(self, variant: BuiltVariant, labels: list[str]) -> str:
        """Log the variant's model in the active MLflow run (never pickle); its model URI."""


class Family(ABC):
    """A model family. Subclass it, set the class attributes, implement the abstract methods."""

    #: what one input is: "text", "image", "tabular", ... (the service's input, `maas init`)
    input_kind: ClassVar[str]
    #: the columns of a row besides "label", e.g. ("text",) or ("path",)
    columns: ClassVar[tuple[str, ...]]
    #: hyperparameters and their defaults: the names `tuning.search_space`/`fixed` may use
    hyperparameters: ClassVar[Mapping[str, Any]]
    #: the BentoML service, "package.module:ServiceClass"; every *.py in that module's folder
    #: (except __init__.py) is copied into the bento and the service reads bento_config.json
    service: ClassVar[str]
    #: the serving runtime of the registered (fp32) model: a key of bentos.runtimes.RUNTIMES
    runtime: ClassVar[str] = "torch"
    #: compression variants it can build besides "fp32" (others in the config are skipped, with
    #: the reason recorded); none: the compress step does not run
    variants: ClassVar[tuple[str, ...]] = ()
    #: the variants made when the pipeline file does not list ``compression.variants``; None:
    #: all of :attr:`variants`
    default_variants: ClassVar[tuple[str, ...] | None] = None
    #: `maas init`: ``init_settings(found, test, base) -> list[str]``, the pipeline file's
    #: data/model/tuning lines for a detected source (``pipelines.init_detect.Detection``; paths
    #: relative to ``base``); None: `maas init` cannot set the family up
    init_settings: ClassVar[Callable[..., list[str]] | None] = None
    #: schemas of the pipeline file's `model.options:` / `data.options:` for this family
    ModelOptions: ClassVar[type[BaseModel]] = NoOptions
    DataOptions: ClassVar[type[BaseModel]] = NoOptions
    #: the scores :meth:`metrics` returns that ``metric``, ``promotion.metric`` and
    #: ``promotion.thresholds`` may name (checked at config load; all higher-is-better)
    metric_names: ClassVar[tuple[str, ...]] = METRICS
    #: minimums of :meth:`agreement` figures a compression variant must reach to be servable, on
    #: top of the ``compression.max_accuracy_drop`` budget on ``promotion.metric`` (none: the
    #: budget alone decides, as for the classifiers)
    variant_floors: ClassVar[Mapping[str, float]] = {}
    #: what the speed figures count, plural ("texts", "images"): the unit of the variant table's
    #: and the gate's inputs per second (the figure's key stays ``texts_per_s`` for every family)
    unit: ClassVar[str] = "texts"

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.model_options = self.ModelOptions.model_validate(cfg.model.options)
        self.data_options = self.DataOptions.model_validate(cfg.data.options)

    def configured(self, cfg: PipelineConfig) -> Family:
        """This family, with its state, reading ``cfg`` instead (a shallow copy; ``self`` is
        untouched): e.g. the compress step's settings for this run."""
        if cfg is self.cfg:
            return self
        other = copy.copy(self)
        other.cfg = cfg
        return other

    # -- data ---------------------------------------------------------------------------------
    @abstractmethod
    def read(self, path: Path, role: str) -> pd.DataFrame:
        """One data source (``role``: "path", "validation_path" or "test_path" of ``cfg.data``)
        read into rows. Raises ``pipelines.data.DataError`` naming the file, column or row."""

    def fingerprint(self, files: dict[str, Path]) -> str:
        """sha256 identifying the sources' contents (``files``: role -> path as configured).
        Default: over each file's bytes; a family whose source is a folder overrides it."""
        from pipelines.data import fingerprint_files

        return fingerprint_files(files)

    @abstractmethod
    def inputs(self, rows: pd.DataFrame) -> list[Any]:
        """What the model consumes for ``rows``, in row order (texts, arrays, ...)."""

    @abstractmethod
    def profile(self, rows: pd.DataFrame) -> pd.DataFrame:
        """The per-row profile the GX gate validates and `maas suite init` drafts a suite from:
        one row per input row, plain str/int/float/bool columns, including ``label``."""

    @abstractmethod
    def drift_profile(self, rows: pd.DataFrame, labels: list[str]) -> Any:
        """The training rows' drift profile (``labels``: the rows' class names), an object with
        ``to_dict()`` that ``validation.drift.compare`` accepts; counts only, never raw data."""

    def describe(self, rows: pd.DataFrame) -> list[Any]:
        """JSON-safe stand-ins for ``rows`` as ``cfg.privacy.log_text`` allows (evaluation
        examples). Default: the row numbers."""
        return [int(i) for i in range(len(rows))]

    def input_example(self, rows: pd.DataFrame) -> Any | None:
        """The input example logged with the model (privacy as ``cfg.privacy.log_text`` allows);
        None: the family's synthetic placeholder."""
        return None

    # -- model --------------------------------------------------------------------------------
    def check(self) -> None:
        """Fail before any work (missing checkpoint file, bad option) with a FamilyError.
        Default: nothing."""
        return None

    @abstractmethod
    def trainer(self, data: Dataset, params: dict[str, Any], seed: int) -> Trainer:
        """A trainer for ``cfg.tuning.max_epochs`` epochs on ``data.train`` (class ids:
        ``data.ids(rows)``, names ``data.id2label``) with ``params`` (:attr:`hyperparameters`
        overridden by the trial's), seeded with ``seed``; it picks its device and precision."""

    @abstractmethod
    def predict_proba(self, model: Any, inputs: list[Any], desc: str | None = None) -> np.ndarray:
        """The model's outputs, one row per input: a classifier's softmax probabilities, columns
        in :meth:`labels` order (another family: its own rows, see the module docstring).
        ``desc``: a progress-bar label (None: no bar)."""

    @abstractmethod
    def labels(self, model: Any) -> list[str]:
        """The names of the output columns in order: a classifier's class names (recorded as the
        logged model's ``metadata.labels``)."""

    def metrics(self, truth: list[str], probs: np.ndarray, model: Any, labels: list[str], *,
                data: Dataset) -> Evaluation:
        """Scores (``accuracy``, ``f1_macro``, ... all higher-is-better) of ``probs`` against the
        true class names; ``labels``: the data's class order; ``data``: the run's split, for
        scores that need more than the scored rows (the text embedder's retrieval index is its
        training split). Default: classification metrics."""
        from pipelines.evaluation import evaluate_predictions

        return evaluate_predictions(truth, probs, self.labels(model), labels)

    def agreement(self, outputs: np.ndarray, reference: np.ndarray) -> dict[str, float]:
        """How close a compression variant's test-set outputs are to fp32's (``reference``):
        figures logged with the variant, ``agreement_with_fp32`` among them (the variant table's
        column), checked against :attr:`variant_floors`. Default: the share of equal argmax
        (same predicted class) and the largest probability difference."""
        import numpy as np

        return {"agreement_with_fp32": float(np.mean(outputs.argmax(1) == reference.argmax(1))),
                "max_abs_prob_diff_vs_fp32": float(np.abs(outputs - reference).max())}

    # -- MLflow -------------------------------------------------------------------------------
    @abstractmethod
    def save(self, model: Any, folder: Path) -> None:
        """A trial's checkpoint into ``folder`` (safetensors/ONNX/JSON only, never pickle)."""

    @abstractmethod
    def load(self, folder: Path) -> Any:
        """The model :meth:`save` wrote into ``folder``."""

    @abstractmethod
    def log_model(self, model: Any, name: str, input_example: Any | None = None) -> Any:
        """Log ``model`` in the active MLflow run (signature, input example, pinned
        requirements; no pickle); returns MLflow's ``ModelInfo`` (``.model_uri``)."""

    @abstractmethod
    def load_logged(self, model_uri: str) -> Any:
        """The model that :meth:`log_model` logged (e.g. ``models:/NAME/3``)."""

    # -- compression and serving --------------------------------------------------------------
    def compressor(self, model: Any, data: Dataset, workdir: Path) -> Compressor:
        """Builds the variants in :attr:`variants` of the tuned ``model`` (files under
        ``workdir``). Default: a family without variants."""
        raise NotImplementedError(f"{type(self).__name__} builds no compression variants")

    def card_facts(self) -> dict[str, Any]:
        """The model card's ``base_checkpoint`` section (what the model started from). Default:
        trained from scratch."""
        return {"spec": None, "from_scratch": True}
