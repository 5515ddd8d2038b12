"""The pipeline's steps, in order, inside one parent MLflow run; and the summary.

load + fingerprint -> validate (GX gate) -> split -> tune (Optuna, nested runs) -> evaluate on test
-> register (challenger) -> champion vs challenger gate -> promote -> model card
-> package (bento; the card then names it).

Each step is a function of one ``RunContext`` (pipelines/steps.py holds the work inside them).
Nothing after a failed step runs. A run that was killed (still RUNNING in MLflow) is resumed when the
same pipeline runs again on the same data (same config hash and data fingerprint): same parent run,
same Optuna study, finished trials kept; registration is idempotent per parent run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import mlflow
from mlflow import MlflowClient

from pipelines import card_facts, steps
from pipelines.config import PipelineConfig
from pipelines.data import load_data, split_data
from pipelines.families import get_family
from pipelines.redact import redact, redact_obj
from pipelines.steps import RunContext
from pipelines.tracking_setup import (
    check_storage,
    check_suite,
    default_storage,
    find_unfinished_run,
    git_commit,
    optuna_summaries,
)

__all__ = ["RunContext", "RunInProgress", "RunResult", "TrackingPermissionDenied",
           "ValidationFailed", "check_storage", "check_suite", "configure_tracking",
           "default_storage", "find_unfinished_run", "git_commit", "is_permission_error",
           "join_study", "open_experiment", "optuna_summaries", "run_pipeline", "step"]

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
                 build: bool = True, resume: bool = True,
                 schedule_attempt: int | None = None) -> RunResult:
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
    from registry.locks import Busy, db_lock

    # a RUNNING run may be live in another process (not killed): never resume that one
    guard = contextlib.ExitStack()
    try:
        guard.enter_context(db_lock(
            storage_url, f"maas-run:{tracking_uri}:{cfg.name}:{config_hash}:{raw.fingerprint}",
            wait=False))
    except Busy as exc:
        raise RunInProgress(
            f"pipeline {cfg.name!r} is already running on this config and data in another "
            f"process ({exc.holder}); add workers to it with `maas tune --worker`, or wait for "
            "it") from None
    with guard:
        return _run_locked(RunContext(
            cfg, family, checkpoint, raw, tracking_uri, experiment_id, config_hash, storage_url,
            trigger=trigger, schedule_attempt=schedule_attempt, build=build, resume=resume,
            t0=t0))


def _run_locked(ctx: RunContext) -> RunResult:
    """The parent run (new, or the killed one resumed) and every step in it, in order."""
    cfg, raw = ctx.cfg, ctx.raw
    run_id = (find_unfinished_run(ctx.experiment_id, ctx.config_hash, raw.fingerprint)
              if ctx.resume else None)
    ctx.resumed = run_id is not None
    if ctx.resumed:
        log.info("resuming unfinished run %s (same config and data)", run_id)
    ctx.commit = git_commit()
    tags = _run_tags(ctx)
    result = RunResult(cfg.name, "", ctx.experiment_id, redact(ctx.tracking_uri),
                       resumed=ctx.resumed, data_fingerprint=raw.fingerprint,
                       model_name=cfg.registry.model_name)
    with mlflow.start_run(run_id=run_id, experiment_id=ctx.experiment_id,
                          run_name=None if ctx.resumed
                          else f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                          tags=None if ctx.resumed else tags) as run:
        ctx.run_id = result.run_id = run.info.run_id
        if ctx.resumed:
            mlflow.set_tag("maas.resumed_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        else:
            steps.log_config(cfg)
        for run_step in _STEPS:
            run_step(ctx, result)
        mlflow.set_tag("maas.status", "finished")
        result.seconds = time.perf_counter() - ctx.t0
        mlflow.log_dict(redact_obj(result.to_dict()), "summary.json")
    return result


def _run_tags(ctx: RunContext) -> dict[str, str]:
    """The tags a new parent run starts with (a resumed run keeps its own)."""
    tags = {
        "maas.role": "pipeline",
        "maas.pipeline": ctx.cfg.name,
        "maas.config_hash": ctx.config_hash,
        "maas.data_fingerprint": ctx.raw.fingerprint,
        "maas.trigger": ctx.trigger,
    }
    if ctx.schedule_attempt:  # `maas run --schedule-attempt N`, given by `maas schedule`
        tags["maas.schedule_attempt"] = str(ctx.schedule_attempt)
    if ctx.commit:
        tags["maas.git_commit"] = ctx.commit
    return tags


def _validate(ctx: RunContext, result: RunResult) -> None:
    with step("validate"):
        ctx.report = steps.validate(ctx)
    result.validation_success = ctx.report.success
    if not ctx.report.success:
        mlflow.set_tag("maas.status", "validation_failed")
        raise ValidationFailed(ctx.report, ctx.run_id)


def _split(ctx: RunContext, result: RunResult) -> None:
    with step("split"):
        data = ctx.data = split_data(ctx.raw, ctx.cfg.data)
        mlflow.log_params({"n_train": len(data.train), "n_validation": len(data.validation),
                           "n_test": len(data.test), "labels": json.dumps(data.id2label)})
        from pipelines import drift_step

        drift_step.log_profile(data)  # no raw text: compared at a later run's promotion


def _tune(ctx: RunContext, result: RunResult) -> None:
    with step("tune"):
        ctx.study, ctx.best = steps.tune(ctx, _heartbeat(ctx.storage_url))
    result.study_name, result.best_trial = ctx.study.study_name, ctx.best.number
    result.best_params = dict(ctx.best.params)


def _evaluate(ctx: RunContext, result: RunResult) -> None:
    with step("evaluate"):
        ctx.model, ctx.tokenizer, ctx.ev = steps.evaluate_best(ctx)
    result.test_metrics = {k: ctx.ev.metrics[k] for k in ("accuracy", "f1_macro")}


def _compress(ctx: RunContext, result: RunResult) -> None:
    if not ctx.cfg.compression.enabled:
        return
    with step("compress"):
        ctx.variants = steps.compress(ctx)
    result.variant, result.variant_speedup = (ctx.variants.choice.chosen,
                                              ctx.variants.choice.speedup)


def _register(ctx: RunContext, result: RunResult) -> None:
    with step("register"):
        ctx.version = steps.register(ctx)
    result.model_version = ctx.version


def _promote(ctx: RunContext, result: RunResult) -> None:
    with step("promote"):
        ctx.decision = steps.gate(ctx)
    result.promoted, result.decision_reason = ctx.decision.promote, ctx.decision.reason


def _card(ctx: RunContext, result: RunResult) -> None:
    with step("card"):  # the version's model card: description + card/ artifacts
        ctx.card = card_facts.publish(ctx.cfg, ctx.run_id, ctx.version, raw=ctx.raw,
                                      data=ctx.data, report=ctx.report, study=ctx.study,
                                      best=ctx.best, ev=ctx.ev, decision=ctx.decision)
    from registry import champion

    current = champion(ctx.cfg.registry.model_name)
    result.champion_version = current.version if current else None


def _package(ctx: RunContext, result: RunResult) -> None:
    if not (ctx.build and ctx.cfg.bento.enabled and ctx.decision.promote):
        return
    with step("package"):
        built = steps.package(ctx.cfg)
    result.bento_tag, result.serve_command = built.bento_tag, built.serve_command
    card_facts.record_bento(ctx.cfg, ctx.run_id, ctx.version, ctx.card, built.bento_tag)


#: the steps in order; each may skip itself (compress, package) or raise to stop the run
_STEPS = (_validate, _split, _tune, _evaluate, _compress, _register, _promote, _card, _package)


def _heartbeat(storage_url: str) -> int:
    """Heartbeat interval (s) of the Optuna storage, for every backend: a dead worker's trial is
    failed and retried, and a killed single-process run's trial too when the run resumes."""
    return int(os.environ.get("MAAS_HEARTBEAT_S", "10"))


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
    store = tuning.make_storage(storage, heartbeat_interval=_heartbeat(storage))
    rid, study_name = _wait_for_study(cfg, store, experiment_id, raw.fingerprint, run_id, wait_s)
    if run_id:
        _check_joined_run(cfg, run_id, raw.fingerprint)
    log.info("worker joining study %s (parent run %s)", study_name, rid)
    data = split_data(raw, cfg.data)
    study = tuning.open_study(cfg, store, study_name, worker=True, seed=seed)
    objective = tuning.Objective(cfg, data, checkpoint, rid, experiment_id)
    tuning.run_study(study, objective, cfg.tuning.n_trials, storage, cfg.tuning.timeout_s)
    return study_name


def _wait_for_study(cfg: PipelineConfig, store, experiment_id: str, fingerprint: str,
                    run_id: str | None, wait_s: float) -> tuple[str, str]:
    """(parent run id, study name) once that run's study exists in ``store``."""
    deadline = time.monotonic() + wait_s
    while True:
        rid = run_id or find_unfinished_run(experiment_id, cfg.config_hash(), fingerprint)
        study_name = f"{cfg.name}-{rid}" if rid else None
        if study_name and study_name in {s.study_name for s in
                                         optuna_summaries(store)}:
            return rid, study_name
        if time.monotonic() > deadline:
            raise RuntimeError(f"no running study of pipeline {cfg.name!r} appeared in "
                               f"{wait_s:.0f} s (start `maas tune` without --worker first)")
        time.sleep(2)


def _check_joined_run(cfg: PipelineConfig, run_id: str, fingerprint: str) -> None:
    """A worker given ``--run-id`` must run the same pipeline file and data as that run."""
    from pipelines.config import ConfigError

    tags = MlflowClient().get_run(run_id).data.tags
    for key, mine in (("maas.config_hash", cfg.config_hash()),
                      ("maas.data_fingerprint", fingerprint)):
        if tags.get(key) != mine:
            raise ConfigError(f"--run-id {run_id}: its {key} is {tags.get(key)!r} but this "
                              f"worker's is {mine!r}: a worker must use the same pipeline "
                              "file and data as the run it joins")
