"""The pipeline's steps, in order, inside one parent MLflow run; and the summary.

load + fingerprint -> validate (GX gate) -> split -> tune (Optuna, nested runs) -> evaluate on test
-> register (challenger) -> champion vs challenger gate -> promote -> model card
-> package (bento; the card then names it).

Each step takes the run's ``RunInputs`` and the typed, frozen results of the steps
before it (pipelines/steps.py holds the work in them); ``RunResult`` is built once, at the end.
Nothing after a failed step runs. A run that was killed (still RUNNING in MLflow) is resumed when
the same pipeline runs again on the same data (same config hash and data fingerprint): same
parent run, same Optuna study, finished trials kept; registration is idempotent per parent run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import mlflow
from mlflow import MlflowClient

from pipelines import card_facts, steps
from pipelines.config import PipelineConfig
from pipelines.data import load_data, split_data
from pipelines.families import load_family
from pipelines.redact import redact, redact_obj
from pipelines.steps import Candidate, RunInputs
from pipelines.tracking_setup import (
    check_storage,
    check_suite,
    default_storage,
    find_unfinished_run,
    git_commit,
    optuna_summaries,
)

__all__ = ["RunInProgress", "RunInputs", "RunResult", "TrackingPermissionDenied",
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
    family = load_family(cfg)
    family.check()  # fail before any work
    check_suite(cfg.validation.suite)
    raw = load_data(cfg.data, family)
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
        return _run_locked(RunInputs(
            cfg, family, raw, tracking_uri, experiment_id, config_hash, storage_url,
            trigger=trigger, schedule_attempt=schedule_attempt, build=build, resume=resume,
            t0=t0))


def _run_locked(run: RunInputs) -> RunResult:
    """The parent run (new, or the killed one resumed) and every step in it, in order."""
    cfg, raw = run.cfg, run.raw
    run_id = (find_unfinished_run(run.experiment_id, run.config_hash, raw.fingerprint)
              if run.resume else None)
    if run_id is not None:
        log.info("resuming unfinished run %s (same config and data)", run_id)
    run = replace(run, resumed=run_id is not None, commit=git_commit())
    with mlflow.start_run(run_id=run_id, experiment_id=run.experiment_id,
                          run_name=None if run.resumed
                          else f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                          tags=None if run.resumed else _run_tags(run)) as active:
        run = replace(run, run_id=active.info.run_id)
        if run.resumed:
            mlflow.set_tag("maas.resumed_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        else:
            steps.log_config(cfg)
        result = _steps(run)
        mlflow.set_tag("maas.status", "finished")
        mlflow.log_dict(redact_obj(result.to_dict()), "summary.json")
    return result


def _steps(run: RunInputs) -> RunResult:
    """Every step in order, each on the results of the ones before; the summary, built once.
    Nothing after a failing step runs; compress and package may skip themselves."""
    report = _validate(run)
    data = _split(run)
    with step("tune"):
        tuned = steps.tune(run, data, _heartbeat(run.storage_url))
    with step("evaluate"):
        model, ev = steps.evaluate_best(run, data, tuned)
    cand = Candidate(report, data, tuned, model, ev, variants=_compress(run, data, model))
    with step("register"):
        version = steps.register(run, cand)
    with step("promote"):
        decision = steps.gate(run, cand, version)
    with step("card"):  # the version's model card: description + card/ artifacts
        card = card_facts.publish(run.cfg, run.run_id, version, raw=run.raw, data=data,
                                  report=report, study=tuned.study, best=tuned.best, ev=ev,
                                  decision=decision)
    from registry import champion

    current = champion(run.cfg.registry.model_name)
    built = _package(run, version, card) if decision.promote else None
    return _result(run, cand, version, decision, current.version if current else None, built)


def _result(run: RunInputs, cand: Candidate, version: str, decision, champion_version,
            built) -> RunResult:
    cfg, tuned, choice = run.cfg, cand.tuned, cand.variants and cand.variants.choice
    return RunResult(
        cfg.name, run.run_id, run.experiment_id, redact(run.tracking_uri), resumed=run.resumed,
        data_fingerprint=run.raw.fingerprint, validation_success=cand.report.success,
        study_name=tuned.study.study_name, best_trial=tuned.best.number,
        best_params=dict(tuned.best.params),
        test_metrics={k: cand.ev.metrics[k] for k in ("accuracy", "f1_macro")},
        model_name=cfg.registry.model_name, model_version=version,
        variant=choice.chosen if choice else None, variant_speedup=choice.speedup if choice
        else None, promoted=decision.promote, decision_reason=decision.reason,
        champion_version=champion_version, bento_tag=built.bento_tag if built else None,
        serve_command=built.serve_command if built else None,
        seconds=time.perf_counter() - run.t0)


def _run_tags(run: RunInputs) -> dict[str, str]:
    """The tags a new parent run starts with (a resumed run keeps its own)."""
    tags = {
        "maas.role": "pipeline",
        "maas.pipeline": run.cfg.name,
        "maas.config_hash": run.config_hash,
        "maas.data_fingerprint": run.raw.fingerprint,
        "maas.trigger": run.trigger,
    }
    if run.schedule_attempt:  # `maas run --schedule-attempt N`, given by `maas schedule`
        tags["maas.schedule_attempt"] = str(run.schedule_attempt)
    if run.commit:
        tags["maas.git_commit"] = run.commit
    return tags


def _validate(run: RunInputs):
    with step("validate"):
        report = steps.validate(run)
    if not report.success:
        mlflow.set_tag("maas.status", "validation_failed")
        raise ValidationFailed(report, run.run_id)
    return report


def _split(run: RunInputs):
    with step("split"):
        data = split_data(run.raw, run.cfg.data)
        mlflow.log_params({"n_train": len(data.train), "n_validation": len(data.validation),
                           "n_test": len(data.test), "labels": json.dumps(data.id2label)})
        from pipelines import drift_step

        drift_step.log_profile(run.family, data)  # no raw data: compared at a later promotion
    return data


def _compress(run: RunInputs, data, model):
    """The variants and the gate's choice; None when compression is off or the family builds
    no variants."""
    if not (run.cfg.compression.enabled and run.family.variants):
        return None
    with step("compress"):
        return steps.compress(run, data, model)


def _package(run: RunInputs, version: str, card: dict[str, Any]):
    """The bento of the new champion (None when the run does not build one)."""
    if not (run.build and run.cfg.bento.enabled):
        return None
    with step("package"):
        built = steps.package(run.cfg)
    card_facts.record_bento(run.cfg, run.run_id, version, card, built.bento_tag)
    return built


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

    family = load_family(cfg)
    family.check()
    raw = load_data(cfg.data, family)
    tracking_uri, experiment_id = open_experiment(cfg)
    check_storage(storage, tracking_uri)
    store = tuning.make_storage(storage, heartbeat_interval=_heartbeat(storage))
    rid, study_name = _wait_for_study(cfg, store, experiment_id, raw.fingerprint, run_id, wait_s)
    if run_id:
        _check_joined_run(cfg, run_id, raw.fingerprint)
    log.info("worker joining study %s (parent run %s)", study_name, rid)
    data = split_data(raw, cfg.data)
    study = tuning.open_study(cfg, store, study_name, worker=True, seed=seed)
    objective = tuning.Objective(cfg, data, family, rid, experiment_id)
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
