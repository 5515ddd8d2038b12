"""The pipeline's steps, in order, inside one parent MLflow run; and the summary.

load + fingerprint -> validate (GX gate) -> split -> tune (Optuna, nested runs) -> evaluate on test
-> register (challenger) -> champion vs challenger gate -> promote -> model card
-> package (bento; the card then names it).

Nothing after a failed step runs. A run that was killed (still RUNNING in MLflow) is resumed when the
same pipeline runs again on the same data (same config hash and data fingerprint): same parent run,
same Optuna study, finished trials kept; registration is idempotent per parent run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import contextlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import mlflow
from mlflow import MlflowClient

from pipelines import card_facts
from pipelines.config import PipelineConfig
from pipelines.data import Dataset, RawData, load_data, split_data
from pipelines.evaluation import Evaluation, confusion_figure, evaluate_predictions
from pipelines.families import get_family
from pipelines.redact import redact, redact_obj

log = logging.getLogger(__name__)


class RunInProgress(RuntimeError):
    """The same pipeline on the same data is running right now in another live process."""


class TrackingPermissionDenied(RuntimeError):
    """The tracking server refused this user (HTTP 403 / PERMISSION_DENIED)."""


def is_permission_error(exc: BaseException) -> bool:
    """An MlflowException that is the tracking server's refusal (403 / PERMISSION_DENIED)."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    if exc.error_code == "PERMISSION_DENIED" or exc.get_http_status_code() == 403:
        return True
    return "error code 403" in str(exc) or "Permission denied" in str(exc)


class ValidationFailed(RuntimeError):
    """The data did not pass the expectation suite; nothing downstream ran."""

    def __init__(self, report: Any, run_id: str) -> None:
        self.report, self.run_id = report, run_id
        super().__init__(f"data validation failed (suite {report.suite_name!r}, run {run_id}):\n"
                         f"{report.summary()}")


@dataclass
class RunResult:
    pipeline: str
    run_id: str
    experiment_id: str
    tracking_uri: str
    resumed: bool = False
    data_fingerprint: str = ""
    validation_success: bool = False
    study_name: str = ""
    best_trial: int | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)
    model_name: str = ""
    model_version: str | None = None
    variant: str | None = None
    variant_speedup: float | None = None
    promoted: bool = False
    decision_reason: str = ""
    champion_version: str | None = None
    bento_tag: str | None = None
    serve_command: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def configure_tracking(cfg: PipelineConfig) -> str:
    """The pipeline's tracking URI wins; else MLFLOW_TRACKING_URI; else MLflow's default
    (``sqlite:///mlflow.db`` in the working directory)."""
    if cfg.tracking_uri:
        mlflow.set_tracking_uri(cfg.tracking_uri)
    return mlflow.get_tracking_uri()


def open_experiment(cfg: PipelineConfig) -> tuple[str, str]:
    """(tracking URI, experiment id of the experiment named after the pipeline). The first contact
    creates a database store's schema, under a lock: processes starting together on an empty
    database would otherwise race on it."""
    from pipelines.tuning import budget_lock

    uri = configure_tracking(cfg)
    try:
        with budget_lock(uri, "maas-mlflow-schema"):
            return uri, mlflow.set_experiment(cfg.name).experiment_id
    except Exception as exc:
        if not is_permission_error(exc):
            raise
        raise TrackingPermissionDenied(
            f"permission denied on the tracking server {redact(uri)}: this user may not use "
            f"experiment {cfg.name!r} (it belongs to another user, or needs a grant from its "
            f"owner or an admin); rename the pipeline or ask for access. Server said: "
            f"{redact(str(exc))[:500]}") from None


def default_storage(tracking_uri: str) -> str:
    """Optuna RDB storage: beside a SQLite tracking store, else ``optuna.db`` in the cwd."""
    env = os.environ.get("MAAS_OPTUNA_STORAGE")
    if env:
        return env
    if tracking_uri.startswith("sqlite:///"):
        db = Path(urlparse(tracking_uri).path if tracking_uri.startswith("sqlite:////")
                  else tracking_uri[len("sqlite:///"):])
        return f"sqlite:///{db.with_name('optuna.db')}"
    return "sqlite:///optuna.db"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def check_storage(storage_url: str, tracking_uri: str) -> None:
    """Optuna and MLflow must not share one database: both keep an alembic ``alembic_version``
    table, and each one's migrations fail on the other's revision."""
    from pipelines.config import ConfigError
    from pipelines.tuning import safe_url

    def norm(url: str) -> str:
        return url.strip().rstrip("/").replace("postgresql+psycopg2://", "postgresql://")

    if norm(storage_url) == norm(tracking_uri):
        raise ConfigError(f"tuning.storage: {safe_url(storage_url)} is also the MLflow tracking "
                          "store; give Optuna its own database (both use an alembic_version "
                          "table), e.g. .../optuna next to .../mlflow")


def check_suite(suite: str) -> None:
    """Fail before any work if the pipeline's expectation suite is unknown or malformed."""
    from validation import load_suite_spec, resolve_suite

    load_suite_spec(resolve_suite(suite))


def find_unfinished_run(experiment_id: str, config_hash: str, fingerprint: str) -> str | None:
    """A parent run of this config and data that was killed before it finished (still RUNNING)."""
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=(f"tags.`maas.config_hash` = '{config_hash}' and "
                       f"tags.`maas.data_fingerprint` = '{fingerprint}' and "
                       "tags.`maas.role` = 'pipeline' and attributes.status = 'RUNNING'"),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


@contextmanager
def step(name: str) -> Iterator[None]:
    """Mark the step in progress on the active run, so a failure names it."""
    t0 = time.perf_counter()
    mlflow.set_tag("maas.step", name)
    log.info("step %s ...", name)
    try:
        yield
    except BaseException:
        mlflow.set_tag("maas.failed_step", name)
        raise
    mlflow.log_metric(f"seconds_{name}", time.perf_counter() - t0)


def run_pipeline(cfg: PipelineConfig, *, trigger: str = "manual", storage: str | None = None,
                 build: bool = True, resume: bool = True) -> RunResult:
    """Run the whole pipeline; raise on the first failing step (the parent run is then FAILED)."""
    t0 = time.perf_counter()
    family = get_family(cfg.model.family)
    checkpoint = family.resolve_checkpoint(cfg.model.checkpoint)  # fail before any work
    check_suite(cfg.validation.suite)
    raw = load_data(cfg.data)
    tracking_uri, experiment_id = open_experiment(cfg)
    config_hash = cfg.config_hash()
    storage_url = storage or cfg.tuning.storage or default_storage(tracking_uri)
    check_storage(storage_url, tracking_uri)
    from pipelines.tuning import Busy, exclusive

    # a RUNNING run may be live in another process (not killed): never resume that one
    guard = contextlib.ExitStack()
    try:
        guard.enter_context(exclusive(
            storage_url, f"maas-run:{tracking_uri}:{cfg.name}:{config_hash}:{raw.fingerprint}"))
    except Busy:
        raise RunInProgress(
            f"pipeline {cfg.name!r} is already running on this config and data in another "
            "process; add workers to it with `maas tune --worker`, or wait for it") from None
    with guard:
        return _run_locked(cfg, family, checkpoint, raw, tracking_uri, experiment_id,
                           config_hash, storage_url, trigger, build, resume, t0)


def _run_locked(cfg, family, checkpoint, raw, tracking_uri, experiment_id, config_hash,
                storage_url, trigger, build, resume, t0) -> RunResult:
    run_id = find_unfinished_run(experiment_id, config_hash, raw.fingerprint) if resume else None
    resumed = run_id is not None
    if resumed:
        log.info("resuming unfinished run %s (same config and data)", run_id)
    tags = {
        "maas.role": "pipeline",
        "maas.pipeline": cfg.name,
        "maas.config_hash": config_hash,
        "maas.data_fingerprint": raw.fingerprint,
        "maas.trigger": trigger,
    }
    if os.environ.get("MAAS_SCHEDULE_ATTEMPT"):  # set by `maas schedule` on each attempt
        tags["maas.schedule_attempt"] = os.environ["MAAS_SCHEDULE_ATTEMPT"]
    commit = git_commit()
    if commit:
        tags["maas.git_commit"] = commit
    result = RunResult(cfg.name, "", experiment_id, redact(tracking_uri), resumed=resumed,
                       data_fingerprint=raw.fingerprint, model_name=cfg.registry.model_name)
    with mlflow.start_run(run_id=run_id, experiment_id=experiment_id,
                          run_name=None if resumed else f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                          tags=None if resumed else tags) as run:
        result.run_id = run.info.run_id
        if resumed:
            mlflow.set_tag("maas.resumed_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        else:
            _log_config(cfg)
        with step("validate"):
            report = _validate(cfg, raw, resumed)
        result.validation_success = report.success
        if not report.success:
            mlflow.set_tag("maas.status", "validation_failed")
            raise ValidationFailed(report, run.info.run_id)
        with step("split"):
            data = split_data(raw, cfg.data)
            mlflow.log_params({"n_train": len(data.train), "n_validation": len(data.validation),
                               "n_test": len(data.test), "labels": json.dumps(data.id2label)})
            from pipelines import drift_step

            drift_step.log_profile(data)  # no raw text: compared at a later run's promotion
        with step("tune"):
            study, best = _tune(cfg, data, checkpoint, run.info.run_id, experiment_id,
                                storage_url)
        result.study_name, result.best_trial = study.study_name, best.number
        result.best_params = dict(best.params)
        with step("evaluate"):
            model, tokenizer, ev = _evaluate_best(cfg, data, family, best)
        result.test_metrics = {k: ev.metrics[k] for k in ("accuracy", "f1_macro")}
        variants = None
        if cfg.compression.enabled:
            with step("compress"):
                variants = _compress(cfg, data, family, model, tokenizer)
            result.variant, result.variant_speedup = (variants.choice.chosen,
                                                      variants.choice.speedup)
        with step("register"):
            version = _register(cfg, data, family, model, tokenizer, ev, report, study, best,
                                run.info.run_id, config_hash, commit, variants)
        result.model_version = version
        with step("promote"):
            decision = _gate(cfg, data, family, version, ev)
        result.promoted, result.decision_reason = decision.promote, decision.reason
        with step("card"):  # the version's model card: description + card/ artifacts
            card = card_facts.publish(cfg, run.info.run_id, version, raw=raw, data=data,
                                      report=report, study=study, best=best, ev=ev,
                                      decision=decision)
        from registry import champion

        current = champion(cfg.registry.model_name)
        result.champion_version = current.version if current else None
        if build and cfg.bento.enabled and decision.promote:
            with step("package"):
                built = _package(cfg)
            result.bento_tag, result.serve_command = built.bento_tag, built.serve_command
            card_facts.record_bento(cfg, run.info.run_id, version, card, built.bento_tag)
        mlflow.set_tag("maas.status", "finished")
        result.seconds = time.perf_counter() - t0
        mlflow.log_dict(redact_obj(result.to_dict()), "summary.json")
    return result


def _log_config(cfg: PipelineConfig) -> None:
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


def _validate(cfg: PipelineConfig, raw: RawData, resumed: bool):
    from validation import validate

    frame = raw.all_rows
    if not resumed:
        mlflow.log_input(
            mlflow.data.from_pandas(frame, source=raw.files["path"], name=f"{cfg.name}-data",
                                    targets="label"),
            context="training",
            tags={"sha256": raw.fingerprint},
        )
    # under the working directory: a failed gate's printed docs path must outlive the process
    docs = Path("maas-data-docs") / mlflow.active_run().info.run_id
    report = validate(frame[["text", "label"]], cfg.validation.suite, docs_dir=docs,
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


def _tune(cfg: PipelineConfig, data: Dataset, checkpoint: Path, run_id: str,
          experiment_id: str, storage_url: str):
    from pipelines import tuning

    study_name = f"{cfg.name}-{run_id}"
    storage = tuning.make_storage(storage_url, heartbeat_interval=_heartbeat(storage_url))
    study = tuning.open_study(cfg, storage, study_name)
    mlflow.set_tags({"optuna.study": study_name, "optuna.storage": tuning.safe_url(storage_url),
                     "optuna.sampler": type(study.sampler).__name__,
                     "optuna.pruner": type(study.pruner).__name__})
    objective = tuning.Objective(cfg, data, checkpoint, run_id, experiment_id)
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
    return study, best


def _heartbeat(storage_url: str) -> int:
    """Heartbeat interval (s) of the Optuna storage, for every backend: a dead worker's trial is
    failed and retried, and a killed single-process run's trial too when the run resumes."""
    return int(os.environ.get("MAAS_HEARTBEAT_S", "10"))


def _evaluate_best(cfg: PipelineConfig, data: Dataset, family, best):
    from pipelines.tuning import CHECKPOINT_ARTIFACT

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            run_id=best.user_attrs["mlflow_run_id"], artifact_path=CHECKPOINT_ARTIFACT,
            dst_path=tmp)
        model, tokenizer = family.load(Path(local))
    ev = _score(cfg, data, family, model, tokenizer, "test (challenger)")
    mlflow.log_metrics({f"test_{k}": v for k, v in ev.metrics.items()})
    fig = confusion_figure(ev)
    mlflow.log_figure(fig, "evaluation/confusion_matrix.png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    from validation.pii import scrub

    texts = scrub(data.test.text.tolist()[:10], cfg.privacy.log_text)  # privacy.log_text
    truth = data.names(data.test)
    examples = [{"text": texts[i], "true": truth[i], "predicted": ev.predictions[i],
                 "confidence": round(ev.confidences[i], 4)} for i in range(min(10, len(texts)))]
    mlflow.log_dict({"examples": examples}, "evaluation/examples.json")
    return model, tokenizer, ev


def _score(cfg: PipelineConfig, data: Dataset, family, model, tokenizer, desc: str) -> Evaluation:
    probs = family.predict_proba(model, tokenizer, data.test.text.tolist(), cfg.model.max_length,
                                 cfg.model.eval_batch_size, desc=desc)
    return evaluate_predictions(data.names(data.test), probs, family.labels_of(model),
                                list(data.id2label.values()))


def _compress(cfg: PipelineConfig, data: Dataset, family, model, tokenizer):
    """Compression variants of the best model (child runs), and the one the gate picks."""
    from pipelines import compression

    labels = family.labels_of(model)
    names = list(data.id2label.values())
    truth = data.names(data.test)

    def evaluate(probs):
        return evaluate_predictions(truth, probs, labels, names).metrics

    outcome = compression.compress(cfg, data, model, tokenizer, family, labels, evaluate)
    log.info("variant chosen: %s", outcome.choice.reason)
    return outcome


def _register(cfg, data, family, model, tokenizer, ev, report, study, best, run_id,
              config_hash, commit, variants=None) -> str:
    from pipelines import compression
    from registry import register
    from validation.pii import loggable_texts

    info = family.log_model(model, tokenizer, "model",  # input example as privacy.log_text allows
                            loggable_texts(data.test.text.tolist(), cfg.privacy.log_text, n=3))
    variant_tags = {}
    if variants is not None:  # the version carries its variants; fp32 is the version's model
        variants.variants[compression.REFERENCE].model_uri = info.model_uri
        compression.record(variants)
        variant_tags = compression.version_tags(variants)
    tags = {
        "maas.pipeline": cfg.name,
        "maas.data_fingerprint": data.fingerprint,
        "maas.suite": report.suite_name,
        "maas.suite_success": str(report.success).lower(),
        "maas.study": study.study_name,
        "maas.best_trial": str(best.number),
        "maas.config_hash": config_hash,
        "maas.model_uri": info.model_uri,
        **{f"maas.metric.{k}": f"{ev.metrics[k]:.6f}" for k in ("accuracy", "f1_macro",
                                                                "precision_macro", "recall_macro")},
    }
    if commit:
        tags["maas.git_commit"] = commit
    tags.update(variant_tags)
    mv = register(info.model_uri, cfg.registry.model_name, run_id=run_id, tags=tags,
                  description=f"{cfg.name}: best of study {study.study_name} "
                              f"(trial {best.number})")
    mlflow.set_tags({"maas.registered_model": cfg.registry.model_name,
                     "maas.registered_version": str(mv.version)})
    return str(mv.version)


def _gate(cfg: PipelineConfig, data: Dataset, family, version: str, ev: Evaluation):
    from registry import champion, promote, should_promote

    name = cfg.registry.model_name
    current = champion(name)
    incumbent = None
    if current is not None and str(current.version) != version:
        model, tokenizer = family.load_logged(f"models:/{name}/{current.version}")
        inc = _score(cfg, data, family, model, tokenizer, f"test (champion v{current.version})")
        incumbent = inc.metrics
        mlflow.log_metrics({f"champion_test_{k}": v for k, v in inc.metrics.items()})
        mlflow.set_tag("maas.champion_compared", str(current.version))
    decision = should_promote(ev.metrics, incumbent, cfg.promotion.metric,
                              cfg.promotion.min_delta, dict(cfg.promotion.thresholds))
    if incumbent is not None:  # drift vs the champion: evidence tags, maybe a block
        from pipelines import drift_step

        decision = drift_step.check(cfg, data, version, current, inc.predictions,
                                    ev.predictions, decision)
    mlflow.log_dict(decision.to_dict(), "promotion/decision.json")
    mlflow.set_tags({"maas.promoted": str(decision.promote).lower(),
                     "maas.decision_reason": decision.reason[:5000]})
    if current is not None and str(current.version) == version:
        return decision  # resumed after promotion already happened
    # a rejected decision is recorded on the version; only an accepted one moves the alias
    promote(name, version, decision, actor="pipeline")
    return decision


def _package(cfg: PipelineConfig):
    from bentos import BentoSettings, build_bento

    b = cfg.bento
    settings = BentoSettings(max_batch_size=b.max_batch_size, max_latency_ms=b.max_latency_ms,
                             max_texts=b.max_texts, max_chars=b.max_chars, timeout=b.timeout,
                             max_concurrency=b.max_concurrency, workers=b.workers,
                             quantize=b.quantize, forward_batch_size=b.forward_batch_size,
                             access_log=b.access_log)
    built = build_bento(f"models:/{cfg.registry.model_name}@champion", settings)
    mlflow.set_tags({"maas.bento_tag": built.bento_tag, "maas.bento_model_tag": built.model_tag})
    return built


def join_study(cfg: PipelineConfig, storage: str, run_id: str | None = None,
               wait_s: float = 600.0, seed: int | None = None) -> str:
    """Worker mode: add this process's trials to the study of a running pipeline run.

    The parent run is ``run_id`` or the newest RUNNING run of this pipeline with the same config
    hash and data fingerprint (waited for up to ``wait_s``, so workers may start first). Returns
    the study name once the study's budget is met; the coordinator (``maas tune`` without
    ``--worker``) then evaluates, registers and promotes.
    """
    from pipelines import tuning

    family = get_family(cfg.model.family)
    checkpoint = family.resolve_checkpoint(cfg.model.checkpoint)
    raw = load_data(cfg.data)
    tracking_uri, experiment_id = open_experiment(cfg)
    check_storage(storage, tracking_uri)
    deadline = time.monotonic() + wait_s
    store = tuning.make_storage(storage, heartbeat_interval=_heartbeat(storage))
    while True:
        rid = run_id or find_unfinished_run(experiment_id, cfg.config_hash(), raw.fingerprint)
        study_name = f"{cfg.name}-{rid}" if rid else None
        if study_name and study_name in {s.study_name for s in
                                         optuna_summaries(store)}:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"no running study of pipeline {cfg.name!r} appeared in "
                               f"{wait_s:.0f} s (start `maas tune` without --worker first)")
        time.sleep(2)
    if run_id:
        from pipelines.config import ConfigError

        tags = MlflowClient().get_run(run_id).data.tags
        for key, mine in (("maas.config_hash", cfg.config_hash()),
                          ("maas.data_fingerprint", raw.fingerprint)):
            if tags.get(key) != mine:
                raise ConfigError(f"--run-id {run_id}: its {key} is {tags.get(key)!r} but this "
                                  f"worker's is {mine!r}: a worker must use the same pipeline "
                                  "file and data as the run it joins")
    log.info("worker joining study %s (parent run %s)", study_name, rid)
    data = split_data(raw, cfg.data)
    study = tuning.open_study(cfg, store, study_name, worker=True, seed=seed)
    objective = tuning.Objective(cfg, data, checkpoint, rid, experiment_id)
    tuning.run_study(study, objective, cfg.tuning.n_trials, storage, cfg.tuning.timeout_s)
    return study_name


def optuna_summaries(storage):
    import optuna

    return optuna.get_all_study_summaries(storage, include_best_trial=False)
