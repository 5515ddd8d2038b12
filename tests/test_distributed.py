"""Scale-out on the machine's real PostgreSQL: several worker processes share one Optuna study,
a killed worker's trial is failed by heartbeat and retried once, and a pipeline killed with SIGKILL
mid-tuning resumes (same parent run, same study) and registers exactly one version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from helpers import PG_POOL_ENV, write_pipeline
from mlflow import MlflowClient

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def _maas(args: list[str], env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _env(tracking: str, **extra: str) -> dict:
    return {**os.environ, **PG_POOL_ENV, "MLFLOW_TRACKING_URI": tracking, "MAAS_HEARTBEAT_S": "2",
            **extra}


def _wait_running_trial(storage: str, proc: subprocess.Popen, log: Path,
                        timeout: float = 240) -> optuna.trial.FrozenTrial:
    """Poll the study storage until a trial run by process ``proc`` is RUNNING."""
    pid = proc.pid
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"process {pid} exited ({proc.returncode}) before running a "
                                 f"trial:\n{log.read_text()[-3000:]}")
        try:
            for summary in optuna.get_all_study_summaries(storage):
                study = optuna.load_study(study_name=summary.study_name, storage=storage)
                for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
                    if t.user_attrs.get("worker", "").endswith(f":{pid}"):
                        return t
        except Exception:
            pass
        time.sleep(0.5)
    raise AssertionError(f"process {pid} never ran a trial")


def _wait_for_log(proc: subprocess.Popen, log: Path, line: str, timeout: float = 300) -> None:
    """Poll ``log`` until it holds ``line``; fail at once if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if line in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {line!r}:\n"
                                 f"{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"no {line!r} in {log} after {timeout:.0f} s")


def _study(storage: str) -> optuna.Study:
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def test_workers_share_one_study_budget_exact_and_killed_trial_retried(
        tmp_path, pg_factory, small_checkpoint):
    # MLflow and Optuna both on the real PostgreSQL (MLflow's SQL store straight on the DB);
    # separate databases: both keep an alembic_version table
    tracking = pg_factory()
    storage = pg_factory()
    pipe = write_pipeline(tmp_path, small_checkpoint, name="dist", tuning__n_trials=4,
                          tuning__max_epochs=2, tuning__pruner={"type": "none"},
                          data__max_rows=800, model__max_length=64)
    env = _env(tracking, BENTOML_HOME=str(tmp_path / "bentoml"))
    coord = _maas(["tune", str(pipe), "--storage", storage, "--no-build"], env, tmp_path,
                  tmp_path / "coord.log")
    workers = [_maas(["tune", str(pipe), "--storage", storage, "--worker"], env, tmp_path,
                     tmp_path / f"worker{i}.log") for i in range(2)]
    try:
        victim = workers[0]
        killed = _wait_running_trial(storage, victim, tmp_path / "worker0.log")
        # one epoch in (of two): the kill lands mid-trial
        _wait_for_log(victim, tmp_path / "worker0.log", f"trial {killed.number} epoch 1/2")
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        assert workers[1].wait(timeout=600) == 0, (tmp_path / "worker1.log").read_text()[-3000:]
        assert coord.wait(timeout=600) == 0, (tmp_path / "coord.log").read_text()[-3000:]
    finally:
        for p in [coord, *workers]:
            if p.poll() is None:
                p.kill()

    study = _study(storage)
    trials = study.get_trials()
    finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                 optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 4, [(t.number, t.state.name) for t in trials]  # budget met exactly
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert [t.number for t in failed] == [killed.number]            # the killed worker's trial
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
    assert retries[0].params == killed.params                       # same params, retried once
    workers_seen = {t.user_attrs["worker"] for t in finished}
    assert len(workers_seen) >= 2                                   # trials really were shared

    mlflow.set_tracking_uri(tracking)
    client = MlflowClient()
    exp = client.get_experiment_by_name("dist")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`maas.role` = 'pipeline'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_id = {c.info.run_id: c for c in children}
    for t in finished:
        run = by_id[t.user_attrs["mlflow_run_id"]]                 # every trial has its run
        assert run.data.tags["maas.trial_number"] == str(t.number)
    dead = client.get_run(killed.user_attrs["mlflow_run_id"])
    assert dead.info.status == "KILLED" and dead.data.tags["maas.trial_state"] == "FAIL"
    versions = client.search_model_versions("name='tiny-sentiment'")
    assert len(versions) == 1


def test_sigkill_mid_tuning_then_same_command_resumes(tmp_path, small_checkpoint):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pipe = write_pipeline(tmp_path, small_checkpoint, name="crash", tuning__n_trials=2,
                          tuning__max_epochs=2, tuning__pruner={"type": "none"},
                          data__max_rows=800, model__max_length=64)
    env = _env(tracking, BENTOML_HOME=str(tmp_path / "bentoml"))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = _maas(["run", str(pipe), "--no-build"], env, tmp_path, tmp_path / "run1.log")
    try:
        # trial 0 finished, trial 1 one epoch in (of two): kill it mid-trial
        _wait_for_log(first, tmp_path / "run1.log", "trial 1 epoch 1/2")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    study = _study(storage)
    before = {t.number: t.state for t in study.get_trials()}
    assert before[0] == optuna.trial.TrialState.COMPLETE
    assert before[1] == optuna.trial.TrialState.RUNNING            # killed mid-trial

    second = _maas(["run", str(pipe), "--no-build"], env, tmp_path, tmp_path / "run2.log")
    assert second.wait(timeout=600) == 0, (tmp_path / "run2.log").read_text()[-3000:]
    out = (tmp_path / "run2.log").read_text()
    assert "(resumed run)" in out

    study = _study(storage)                                          # the same study
    trials = study.get_trials()
    states = {t.number: t.state for t in trials}
    assert states[0] == optuna.trial.TrialState.COMPLETE             # finished trial kept
    assert states[1] == optuna.trial.TrialState.FAIL                 # interrupted: failed ...
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retries) == 1                                         # ... and retried once
    assert sum(s == optuna.trial.TrialState.COMPLETE for s in states.values()) == 2  # budget

    mlflow.set_tracking_uri(tracking)
    client = MlflowClient()
    exp = client.get_experiment_by_name("crash")
    parents = client.search_runs([exp.experiment_id], "tags.`maas.role` = 'pipeline'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"   # resumed, not restarted
    assert "maas.resumed_at" in parents[0].data.tags
    assert len(client.search_model_versions("name='tiny-sentiment'")) == 1

    # a finished run is never resumed: the same command again starts a new run and version 2
    third = _maas(["run", str(pipe), "--no-build"], env, tmp_path, tmp_path / "run3.log")
    assert third.wait(timeout=600) == 0, (tmp_path / "run3.log").read_text()[-3000:]
    assert "(resumed run)" not in (tmp_path / "run3.log").read_text()
    assert len(client.search_runs([exp.experiment_id], "tags.`maas.role` = 'pipeline'")) == 2
    assert len(client.search_model_versions("name='tiny-sentiment'")) == 2
