"""Optuna tuning where every trial is a nested MLflow run, logged live (not after the trial).

The study lives in an Optuna RDB storage (SQLite by default, PostgreSQL to share it between worker
processes or machines). Each trial reports the validation metric after every epoch so the pruner
can stop it; the trial's MLflow run carries its params, per-epoch metrics and its final state
(``maas.trial_state`` = COMPLETE / PRUNED / FAIL). A trial that beats the study's best so far logs
its weights (safetensors) to its own run under ``checkpoint/``: the parent picks them up from
there, whichever worker ran it.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import tempfile
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna

from pipelines import _compat
from pipelines.config import CategoricalParam, FloatParam, IntParam, PipelineConfig, PrunerConfig
from pipelines.data import Dataset
from pipelines.families.base import Family, FamilyError
from registry.locks import db_lock

log = logging.getLogger(__name__)

CHECKPOINT_ARTIFACT = "checkpoint"

#: the storage each study was opened on (:func:`open_study`), for heartbeats and retries
_STORAGES: weakref.WeakKeyDictionary[optuna.Study, optuna.storages.BaseStorage] = \
    weakref.WeakKeyDictionary()


def make_pruner(cfg: PrunerConfig, max_epochs: int) -> optuna.pruners.BasePruner:
    if cfg.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.n_startup_trials,
                                           n_warmup_steps=cfg.n_warmup_steps)
    if cfg.type == "percentile":
        return optuna.pruners.PercentilePruner(cfg.percentile,  # keeps the top cfg.percentile %
                                               n_startup_trials=cfg.n_startup_trials,
                                               n_warmup_steps=cfg.n_warmup_steps)
    if cfg.type == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=cfg.min_resource,
                                              max_resource=max_epochs,
                                              reduction_factor=cfg.reduction_factor)
    if cfg.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=cfg.min_resource,
                                                      reduction_factor=cfg.reduction_factor)
    return optuna.pruners.NopPruner()


def make_storage(url: str, heartbeat_interval: int | None = None) -> optuna.storages.RDBStorage:
    """RDB storage; with a heartbeat, a worker that dies mid-trial gets its trial failed and
    retried once by another worker (RetryFailedTrialCallback)."""
    kwargs: dict[str, Any] = {"engine_kwargs": {"pool_pre_ping": True}}
    if heartbeat_interval:
        kwargs.update(
            heartbeat_interval=heartbeat_interval,
            grace_period=heartbeat_interval * 3,
            failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=1),
        )
    # workers starting together on an empty database would race to create Optuna's schema
    with budget_lock(url, "maas-optuna-schema"):
        return optuna.storages.RDBStorage(url, **kwargs)


def open_study(cfg: PipelineConfig, storage: optuna.storages.BaseStorage, study_name: str,
               worker: bool = False, seed: int | None = None) -> optuna.Study:
    """Create or load the study. The coordinator's sampler is seeded with ``sampler_seed`` (a
    single-process run is reproducible); each extra worker gets ``seed`` or, without one, a seed
    of its own: with one shared seed every worker would draw the same parameters in lock-step."""
    if not worker:
        seed = cfg.tuning.sampler_seed
    elif seed is None:  # an extra worker without an explicit seed: its own
        base = cfg.tuning.sampler_seed or 0
        seed = (base * 1_000_003 + os.getpid() + time.time_ns() % 1_000_000) % (2**32)
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        direction=cfg.tuning.direction,
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=make_pruner(cfg.tuning.pruner, cfg.tuning.max_epochs),
        load_if_exists=True,
    )
    _STORAGES[study] = storage
    return study


def _storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    try:
        return _STORAGES[study]
    except KeyError:
        raise ValueError(f"study {study.study_name!r} was not opened with "
                         "pipelines.tuning.open_study") from None


def suggest(trial: optuna.Trial, cfg: PipelineConfig) -> dict[str, Any]:
    params: dict[str, Any] = dict(cfg.tuning.fixed)
    for name, spec in cfg.tuning.space(cfg.model.module is not None).items():
        if isinstance(spec, FloatParam):
            params[name] = trial.suggest_float(name, spec.low, spec.high, log=spec.log)
        elif isinstance(spec, IntParam):
            params[name] = trial.suggest_int(name, spec.low, spec.high, step=spec.step,
                                             log=spec.log)
        elif isinstance(spec, CategoricalParam):
            params[name] = trial.suggest_categorical(name, spec.choices)
    return params


def safe_url(url: str) -> str:
    """A storage URL with its credentials masked (see :func:`pipelines.redact.redact`)."""
    from pipelines.redact import redact

    return redact(url)


@dataclass
class Objective:
    """One trial = one nested MLflow run under ``parent_run_id``; safe to run in many workers."""

    cfg: PipelineConfig
    data: Dataset
    family: Family
    parent_run_id: str
    experiment_id: str

    def __call__(self, trial: optuna.Trial) -> float:
        cfg, family = self.cfg, self.family
        params = suggest(trial, cfg)
        _close_failed_attempt(trial)
        with mlflow.start_run(
            run_name=f"trial-{trial.number}",
            experiment_id=self.experiment_id,
            parent_run_id=self.parent_run_id,
            nested=True,
            tags={"maas.trial_number": str(trial.number), "optuna.study": trial.study.study_name,
                  "maas.trial_state": "RUNNING"},
        ) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
            mlflow.log_params(params)
            pruned: optuna.TrialPruned | None = None
            try:
                value = self._fit(trial, family, params)
            except optuna.TrialPruned as exc:
                mlflow.set_tag("maas.trial_state", "PRUNED")
                pruned = exc
            except Exception as exc:
                # leaving the with-block with the exception marks this run FAILED
                mlflow.set_tags({"maas.trial_state": "FAIL", "maas.error": repr(exc)[:4000]})
                raise
            else:
                mlflow.set_tag("maas.trial_state", "COMPLETE")
        if pruned is not None:
            raise pruned
        return value

    def _fit(self, trial: optuna.Trial, family: Family, params: dict[str, Any]) -> float:
        cfg, data = self.cfg, self.data
        trainer = family.trainer(data, params, seed=cfg.tuning.sampler_seed + trial.number)
        mlflow.set_tag("maas.precision", getattr(trainer, "precision", "fp32"))
        labels = list(data.id2label.values())
        y_val, x_val = data.names(data.validation), family.inputs(data.validation)
        value = float("nan")
        try:
            for epoch in range(1, cfg.tuning.max_epochs + 1):
                started = time.monotonic()
                loss = trainer.train_epoch(
                    desc=f"trial {trial.number} epoch {epoch}/{cfg.tuning.max_epochs}")
                model = trainer.model
                ev = family.metrics(y_val, family.predict_proba(model, x_val), model, labels,
                                    data=data)
                value = ev.metrics[cfg.metric]
                mlflow.log_metrics({"train_loss": loss,
                                    **{f"val_{k}": v for k, v in ev.metrics.items()}}, step=epoch)
                trial.report(value, epoch)
                log.info("trial %d epoch %d/%d: train_loss=%.4f val_%s=%.4f (%.1f s)",
                         trial.number, epoch, cfg.tuning.max_epochs, loss, cfg.metric, value,
                         time.monotonic() - started)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at epoch {epoch}")
            if self._is_best(trial.study, value):
                with tempfile.TemporaryDirectory() as tmp:
                    family.save(trainer.model, Path(tmp))
                    mlflow.log_artifacts(tmp, CHECKPOINT_ARTIFACT)
                trial.set_user_attr("checkpoint", CHECKPOINT_ARTIFACT)
            return value
        finally:
            del trainer  # run_study collects its cycles after the trial

    def _is_best(self, study: optuna.Study, value: float) -> bool:
        done = [t.value for t in study.get_trials(deepcopy=False,
                                                  states=(optuna.trial.TrialState.COMPLETE,))
                if t.value is not None]
        if not done:
            return True
        best = max(done) if self.cfg.tuning.direction == "maximize" else min(done)
        return value >= best if self.cfg.tuning.direction == "maximize" else value <= best


FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def budget_lock(storage_url: str, study_name: str):
    """Serialise "is there budget left? then claim a trial" between the workers of one study (and
    first-contact schema creation, keyed by a constant name)."""
    return db_lock(storage_url, f"maas-budget:{study_name}", wait=True)


def run_study(study: optuna.Study, objective: Objective, n_trials: int, storage_url: str,
              timeout_s: float | None = None, poll_s: float = 1.0,
              show_progress_bar: bool = True) -> None:
    """Work on the study until it holds exactly ``n_trials`` finished (complete or pruned) trials.

    Any number of workers may run this on the same study (same RDB storage): a trial is claimed
    (``study.ask``) only under :func:`budget_lock` and only while finished + running trials are
    under the budget, so the budget is met exactly. A worker with nothing to claim waits for the
    others' trials to finish, or to go stale: Optuna's heartbeat marks a dead worker's trial FAIL
    and ``RetryFailedTrialCallback`` re-queues it once (same params), which the next claim picks
    up. A resumed study keeps its finished trials.
    """
    from pipelines.progress import progress

    storage = _storage_of(study)
    deadline = time.monotonic() + timeout_s if timeout_s else None
    bar = progress(total=n_trials, desc=f"study {study.study_name[:40]}", unit="trial",
                   enabled=show_progress_bar)
    # what exists before the study (imported libraries, the data) is frozen out of the garbage
    # collector's scans: the collection after each trial (frees the trainer's cycles, its model
    # and optimizer state) then scans what the trial made, not the whole heap (0.4-0.8 s a call)
    gc.freeze()
    try:
        while True:
            if _compat.heartbeat_interval(storage):
                optuna.storages.fail_stale_trials(study)
            with budget_lock(storage_url, study.study_name):
                trials = study.get_trials(deepcopy=False)
                finished = sum(t.state in FINISHED for t in trials)
                running = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)
                errors = sum(t.state == optuna.trial.TrialState.FAIL
                             and "maas_error" in t.user_attrs for t in trials)
                bar.n = finished
                bar.refresh()
                if finished >= n_trials:
                    return
                if errors >= max(3, n_trials):
                    raise RuntimeError(f"{errors} trials raised errors; giving up (see the "
                                       "trials' MLflow runs, tag maas.error)")
                if deadline is not None and time.monotonic() > deadline:
                    log.warning("tuning timeout reached with %d/%d trials", finished, n_trials)
                    return
                trial = _compat.ask(study) if finished + running < n_trials else None
            if trial is None:
                time.sleep(poll_s)  # the last trials run elsewhere: wait for them (or staleness)
                continue
            with _compat.heartbeat(storage, study.study_name, trial.number):
                _run_trial(study, trial, objective)
            gc.collect()
    finally:
        gc.unfreeze()
        bar.close()


def _run_trial(study: optuna.Study, trial: optuna.Trial, objective: Objective) -> None:
    """Run and tell one trial; one log line per trial (state, value, seconds)."""
    from optuna.trial import TrialState

    started = time.monotonic()
    try:
        value = objective(trial)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
        log.info("trial %d PRUNED (%.1f s)", trial.number, time.monotonic() - started)
    except FamilyError as exc:  # the model itself cannot work (e.g. an own module's forward):
        trial.set_user_attr("maas_error", repr(exc)[:2000])  # stop the run (exit 2), no retries
        study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as exc:  # noqa: BLE001 - any objective error fails only this trial
        log.error("trial %d FAIL (%.1f s): %r", trial.number, time.monotonic() - started, exc)
        trial.set_user_attr("maas_error", repr(exc)[:2000])
        study.tell(trial, state=TrialState.FAIL)
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    else:
        study.tell(trial, value)
        log.info("trial %d COMPLETE: value=%.4f (%.1f s)", trial.number, value,
                 time.monotonic() - started)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The best complete trial that has a checkpoint logged."""
    complete = [t for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
                if t.value is not None and "checkpoint" in t.user_attrs]
    if not complete:
        states = [t.state.name for t in study.trials]
        raise RuntimeError(f"no trial completed (states: {states}); see the trials' MLflow runs "
                           "(tag maas.error) for the failures")
    reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
    return sorted(complete, key=lambda t: t.value, reverse=reverse)[0]


def log_study(study: optuna.Study) -> None:
    """Study table and plots (optimisation history, parameter importances) on the active run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    df = study.trials_dataframe()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "optuna_trials.csv"
        df.to_csv(path, index=False)
        mlflow.log_artifact(str(path), "optuna")
    plots = {"optimization_history": ovm.plot_optimization_history,
             "param_importances": ovm.plot_param_importances,
             "intermediate_values": ovm.plot_intermediate_values}
    for name, fn in plots.items():
        try:
            ax = fn(study)
            fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
            fig.tight_layout()
            mlflow.log_figure(fig, f"optuna/{name}.png")
            plt.close(fig)
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as exc:
            log.info("optuna plot %s skipped: %s", name, exc)


def _close_failed_attempt(trial: optuna.Trial) -> None:
    """A retried trial inherits the dead attempt's user attrs: close that attempt's MLflow run."""
    old = trial.user_attrs.get("mlflow_run_id")
    if not old:
        return
    frozen = [t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number]
    with warnings.catch_warnings():  # retried_trial_number is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if not frozen or optuna.storages.RetryFailedTrialCallback.retried_trial_number(
                frozen[0]) is None:
            return
    client = mlflow.MlflowClient()
    try:
        if client.get_run(old).info.status == "RUNNING":
            client.set_tag(old, "maas.trial_state", "FAIL")
            client.set_tag(old, "maas.retried_as", str(trial.number))
            client.set_terminated(old, status="KILLED")
    except mlflow.exceptions.MlflowException as exc:
        log.warning("could not close the failed attempt's run %s: %s", old, exc)
