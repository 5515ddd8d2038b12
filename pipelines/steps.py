"""The work inside the pipeline's steps. Each takes the run's :class:`RunInputs` and the typed,
frozen results of the steps before it (:class:`Tuned`, :class:`Candidate`), and returns its own;
pipelines/run.py drives them in order inside the parent run. Only the family
(``run.family``, the contract in ``families/base.py``) touches rows, inputs and models."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow

from pipelines.config import PipelineConfig
from pipelines.config_compression import within_run_deadline
from pipelines.data import Dataset, RawData
from pipelines.evaluation import Evaluation, confusion_figure
from pipelines.families.base import Family
from pipelines.redact import redact, redact_obj

if TYPE_CHECKING:
    import optuna

    from bentos.build import BuildResult
    from pipelines.compression import Outcome
    from registry import Decision
    from validation import ValidationReport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInputs:
    """What one pipeline run starts with (then its parent run, once started or resumed)."""

    cfg: PipelineConfig
    family: Family
    raw: RawData
    tracking_uri: str
    experiment_id: str
    config_hash: str
    storage_url: str
    trigger: str = "manual"
    schedule_attempt: int | None = None  # the attempt of a `maas schedule` fire
    build: bool = True
    resume: bool = True
    t0: float = field(default_factory=time.perf_counter)
    commit: str | None = None
    run_id: str = ""  # the parent run, once started (or resumed)
    resumed: bool = False


@dataclass(frozen=True)
class Tuned:
    """The tune step's result: the study and its best trial (with a logged checkpoint)."""

    study: optuna.Study
    best: optuna.trial.FrozenTrial


@dataclass(frozen=True)
class Candidate:
    """The challenger and its evidence: what register, gate and card read."""

    report: ValidationReport
    data: Dataset
    tuned: Tuned
    model: Any  # the family's model (opaque here; only the family reads it)
    ev: Evaluation
    variants: Outcome | None = None


def log_config(cfg: PipelineConfig) -> None:
    mlflow.log_dict(redact_obj(cfg.model_dump(mode="json")), "pipeline/config.json")
    if cfg.source_file:  # the file as written, credentials masked
        source = Path(cfg.source_file)
        mlflow.log_text(redact(source.read_text()), f"pipeline/{source.name}")
    flat = {
        "model.family": cfg.model.family,
        "model.checkpoint": cfg.model.checkpoint,
        "model.max_length": cfg.model.max_length,
        "tuning.n_trials": cfg.tuning.n_trials,
        "tuning.max_epochs": cfg.tuning.max_epochs,
        "tuning.pruner": cfg.tuning.pruner.type,
        "tuning.sampler_seed": cfg.tuning.sampler_seed,
        "metric": cfg.metric,
        "validation.suite": cfg.validation.suite,
    }
    mlflow.log_params(flat)


def validate(run: RunInputs) -> ValidationReport:
    """The GX gate over the family's per-row profile of every source; the report."""
    from validation import validate as validate_frame

    cfg, raw = run.cfg, run.raw
    frame = raw.all_rows
    if not run.resumed:
        mlflow.log_input(
            mlflow.data.from_pandas(frame, source=raw.files["path"], name=f"{cfg.name}-data",
                                    targets="label"),
            context="training",
            tags={"sha256": raw.fingerprint},
        )
    # under the working directory: a failed gate's printed docs path must outlive the process
    docs = Path("maas-data-docs") / mlflow.active_run().info.run_id
    report = validate_frame(run.family.profile(frame), cfg.validation.suite, docs_dir=docs,
                            examples=cfg.privacy.log_text)  # privacy: data values in report + docs
    mlflow.log_dict(report.to_dict(), "validation/result.json")
    if report.docs_dir and Path(report.docs_dir).is_dir():
        mlflow.log_artifacts(str(report.docs_dir), "validation/data_docs")
    if report.success:  # kept (and printed) only when the gate fails
        shutil.rmtree(docs, ignore_errors=True)
        with contextlib.suppress(OSError):
            docs.parent.rmdir()  # only if now empty
    mlflow.set_tags({"maas.suite": report.suite_name,
                     "maas.suite_success": str(report.success).lower()})
    mlflow.log_metric("validation_success", float(report.success))
    return report


def tune(run: RunInputs, data: Dataset, heartbeat_interval: int) -> Tuned:
    """The Optuna study of this parent run (resumed with it), run to its budget."""
    from pipelines import tuning

    cfg, storage_url = run.cfg, run.storage_url
    study_name = f"{cfg.name}-{run.run_id}"
    storage = tuning.make_storage(storage_url, heartbeat_interval=heartbeat_interval)
    study = tuning.open_study(cfg, storage, study_name)
    mlflow.set_tags({"optuna.study": study_name, "optuna.storage": tuning.safe_url(storage_url),
                     "optuna.sampler": type(study.sampler).__name__,
                     "optuna.pruner": type(study.pruner).__name__})
    objective = tuning.Objective(cfg, data, run.family, run.run_id, run.experiment_id)
    tuning.run_study(study, objective, cfg.tuning.n_trials, storage_url, cfg.tuning.timeout_s)
    tuning.log_study(study)
    best = tuning.best_trial(study)
    states: dict[str, int] = {}
    for t in study.trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    mlflow.log_metrics({f"trials_{k.lower()}": v for k, v in states.items()})
    mlflow.log_metric(f"best_val_{cfg.metric}", best.value)
    mlflow.set_tags({"maas.best_trial": str(best.number),
                     "maas.best_trial_run_id": best.user_attrs.get("mlflow_run_id", "")})
    mlflow.log_params({f"best.{k}": v for k, v in best.params.items()})
    return Tuned(study, best)


def evaluate_best(run: RunInputs, data: Dataset, tuned: Tuned) -> tuple[Any, Evaluation]:
    """The best trial's checkpoint scored on the test set; (the family's model, evaluation)."""
    from pipelines.tuning import CHECKPOINT_ARTIFACT

    family = run.family
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            run_id=tuned.best.user_attrs["mlflow_run_id"], artifact_path=CHECKPOINT_ARTIFACT,
            dst_path=tmp)
        model = family.load(Path(local))
    ev = score(run, data, model, "test (challenger)")
    mlflow.log_metrics({f"test_{k}": v for k, v in ev.metrics.items()})
    fig = confusion_figure(ev)
    mlflow.log_figure(fig, "evaluation/confusion_matrix.png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    shown = family.describe(data.test.iloc[:10])  # as privacy.log_text allows
    truth = data.names(data.test)
    key = family.input_kind
    examples = [{key: shown[i], "true": truth[i], "predicted": ev.predictions[i],
                 "confidence": round(ev.confidences[i], 4)} for i in range(min(10, len(shown)))]
    mlflow.log_dict({"examples": examples}, "evaluation/examples.json")
    return model, ev


def score(run: RunInputs, data: Dataset, model: Any, desc: str) -> Evaluation:
    """``model`` (the family's) scored on the test set."""
    family = run.family
    probs = family.predict_proba(model, family.inputs(data.test), desc=desc)
    return family.metrics(data.names(data.test), probs, model, list(data.id2label.values()),
                          data=data)


def compress(run: RunInputs, data: Dataset, model: Any) -> Outcome:
    """Compression variants of the best model (child runs), and the one the gate picks."""
    from pipelines import compression

    family = run.family
    truth, labels = data.names(data.test), list(data.id2label.values())

    def evaluate(probs):
        return family.metrics(truth, probs, model, labels, data=data).metrics

    cfg = within_run_deadline(run.cfg, time.perf_counter() - run.t0)
    if cfg is not run.cfg:
        log.info("distillation budget %.0f s: what is left of compression.distillation."
                 "run_deadline_s = %g s", cfg.compression.distillation.time_budget_s,
                 run.cfg.compression.distillation.run_deadline_s)
    outcome = compression.compress(cfg, data, model, family.configured(cfg), evaluate)
    log.info("variant chosen: %s", outcome.choice.reason)
    return outcome


def register(run: RunInputs, cand: Candidate) -> str:
    """Log the model and register it as a new version (the challenger); its version string."""
    from pipelines import compression
    from registry import register as register_model

    cfg, variants, ev, tuned = run.cfg, cand.variants, cand.ev, cand.tuned
    family = run.family
    info = family.log_model(cand.model, "model", family.input_example(cand.data.test))
    variant_tags = {}
    if variants is not None:  # the version carries its variants; fp32 is the version's model
        variants.variants[compression.REFERENCE].model_uri = info.model_uri
        compression.record(variants)
        variant_tags = compression.version_tags(variants)
    tags = {
        "maas.pipeline": cfg.name,
        "maas.family": cfg.model.family,
        "maas.service": family.service,
        "maas.runtime": family.runtime,
        "maas.data_fingerprint": cand.data.fingerprint,
        "maas.suite": cand.report.suite_name,
        "maas.suite_success": str(cand.report.success).lower(),
        "maas.study": tuned.study.study_name,
        "maas.best_trial": str(tuned.best.number),
        "maas.config_hash": run.config_hash,
        "maas.model_uri": info.model_uri,
        **{f"maas.metric.{k}": f"{ev.metrics[k]:.6f}"
           for k in ("accuracy", "f1_macro", "precision_macro", "recall_macro")},
    }
    if run.commit:
        tags["maas.git_commit"] = run.commit
    tags.update(variant_tags)
    mv = register_model(info.model_uri, cfg.registry.model_name, run_id=run.run_id, tags=tags,
                        description=f"{cfg.name}: best of study {tuned.study.study_name} "
                                    f"(trial {tuned.best.number})")
    mlflow.set_tags({"maas.registered_model": cfg.registry.model_name,
                     "maas.registered_version": str(mv.version)})
    return str(mv.version)


def gate(run: RunInputs, cand: Candidate, version: str) -> Decision:
    """Champion vs challenger (and drift vs the champion); an accepted decision moves the alias."""
    from registry import champion, promote, should_promote

    cfg, ev = run.cfg, cand.ev
    name = cfg.registry.model_name
    current = champion(name)
    incumbent = None
    if current is not None and str(current.version) != version:
        model = run.family.load_logged(f"models:/{name}/{current.version}")
        inc = score(run, cand.data, model, f"test (champion v{current.version})")
        incumbent = inc.metrics
        mlflow.log_metrics({f"champion_test_{k}": v for k, v in inc.metrics.items()})
        mlflow.set_tag("maas.champion_compared", str(current.version))
    decision = should_promote(ev.metrics, incumbent, cfg.promotion.metric,
                              cfg.promotion.min_delta, dict(cfg.promotion.thresholds))
    if incumbent is not None:  # drift vs the champion: evidence tags, maybe a block
        from pipelines import drift_step

        decision = drift_step.check(cfg, run.family, cand.data, version, current,
                                    inc.predictions, ev.predictions, decision)
    mlflow.log_dict(decision.to_dict(), "promotion/decision.json")
    mlflow.set_tags({"maas.promoted": str(decision.promote).lower(),
                     "maas.decision_reason": decision.reason[:5000]})
    if current is not None and str(current.version) == version:
        return decision  # resumed after promotion already happened
    # a rejected decision is recorded on the version; only an accepted one moves the alias
    promote(name, version, decision, actor="pipeline")
    return decision


def package(cfg: PipelineConfig) -> BuildResult:
    """The champion built into a bento with the pipeline's ``bento:`` settings."""
    from bentos import build_bento

    built = build_bento(f"models:/{cfg.registry.model_name}@champion", cfg.bento.settings())
    mlflow.set_tags({"maas.bento_tag": built.bento_tag, "maas.bento_model_tag": built.model_tag})
    return built
