"""The pipeline through the real CLI in-process: real MLflow SQLite store, real Optuna study,
real GX gate, a tiny BERT built from a config. Bad inputs: a clear message, nothing registered."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from helpers import SST2, maas, write_pipeline
from mlflow import MlflowClient

from pipelines.cli import main


def registered_versions() -> list:
    client = MlflowClient()
    return [v for m in client.search_registered_models()
            for v in client.search_model_versions(f"name='{m.name}'")]


@pytest.mark.slow
def test_run_registers_promotes_and_logs_everything(mlflow_store, tmp_path, tiny_checkpoint):
    pipe = write_pipeline(tmp_path, tiny_checkpoint)
    res = maas("run", str(pipe), "--no-build")
    assert res.exit_code == 0, res.output
    assert "registered        tiny-sentiment version 1" in res.output
    assert "promoted          yes" in res.output

    client = MlflowClient()
    exp = client.get_experiment_by_name("tiny")
    parents = client.search_runs([exp.experiment_id], "tags.`maas.role` = 'pipeline'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    tags = parent.data.tags
    assert len(tags["maas.data_fingerprint"]) == 64 and tags["maas.suite_success"] == "true"
    assert tags["optuna.pruner"] == "MedianPruner" and tags["optuna.study"].startswith("tiny-")
    assert {"test_accuracy", "test_f1_macro", "validation_success"} <= set(parent.data.metrics)
    assert parent.inputs.dataset_inputs, "dataset logged with mlflow.log_input"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"validation", "optuna", "evaluation", "promotion"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "optuna")}
    assert "optuna/optimization_history.png" in plots
    docs = [a.path for a in client.list_artifacts(parent.info.run_id, "validation/data_docs")]
    assert docs, "GX data docs logged"

    trials = client.search_runs([exp.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(trials) == 2
    for t in trials:
        assert t.data.tags["maas.trial_state"] in {"COMPLETE", "PRUNED"}
        assert "learning_rate" in t.data.params
        hist = client.get_metric_history(t.info.run_id, "val_accuracy")
        assert [m.step for m in hist][:1] == [1]

    mv = client.get_model_version_by_alias("tiny-sentiment", "champion")
    assert str(mv.version) == "1"
    assert mv.tags["maas.data_fingerprint"] == tags["maas.data_fingerprint"]
    assert mv.tags["maas.study"] == tags["optuna.study"]
    assert mv.tags["maas.decision.promote"] == "true"
    # the registered model loads back with the transformers flavour and predicts both labels' probs
    import mlflow.transformers

    pipe_ = mlflow.transformers.load_model("models:/tiny-sentiment@champion")
    out = pipe_(["a wonderful film", "dull and lifeless"], top_k=None)
    assert {d["label"] for d in out[0]} == {"negative", "positive"}


@pytest.mark.slow
def test_second_run_not_promoted_then_manual_promote_and_rollback(mlflow_store, tmp_path,
                                                                   tiny_checkpoint):
    pipe = write_pipeline(tmp_path, tiny_checkpoint, tuning__n_trials=1, tuning__max_epochs=1)
    assert maas("run", str(pipe), "--no-build").exit_code == 0
    # the challenger must beat the champion by a full point of accuracy: it cannot
    pipe2 = write_pipeline(tmp_path, tiny_checkpoint, tuning__n_trials=1, tuning__max_epochs=1,
                           promotion__min_delta=1.0)
    res = maas("run", str(pipe2), "--no-build")
    assert res.exit_code == 0, res.output
    assert "promoted          no" in res.output
    client = MlflowClient()
    assert str(client.get_model_version_by_alias("tiny-sentiment", "champion").version) == "1"
    v2 = client.get_model_version("tiny-sentiment", "2")
    assert v2.aliases == ["challenger"]
    assert v2.tags["maas.decision.promote"] == "false"
    assert "maas.decision.incumbent" in v2.tags  # both scores recorded as evidence
    # each run is its own parent run with its own study; run 1 is untouched
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                              "tags.`maas.role` = 'pipeline'")
    assert len({r.data.tags["optuna.study"] for r in runs}) == 2
    assert all(r.info.status == "FINISHED" for r in runs)

    assert maas("promote", "tiny-sentiment", "2").exit_code == 0
    assert str(client.get_model_version_by_alias("tiny-sentiment", "champion").version) == "2"
    res = maas("rollback", "tiny-sentiment")
    assert res.exit_code == 0, res.output
    assert str(client.get_model_version_by_alias("tiny-sentiment", "champion").version) == "1"
    res = maas("models", "tiny-sentiment")
    assert res.exit_code == 0 and "champion" in res.output


def _bad_tsv(tmp_path: Path, mutate) -> Path:
    df = pd.read_csv(SST2 / "train_sample.tsv", sep="\t", quoting=3, nrows=400)
    df = mutate(df)
    path = tmp_path / "bad.tsv"
    df.to_csv(path, sep="\t", index=False, quoting=3)
    return path


BAD_CASES = {
    "missing_file": (lambda tmp, ck: {"data__path": str(tmp / "nope.tsv")}, 3,
                     "file not found"),
    "unknown_column": (lambda tmp, ck: {"data__text_column": "review"}, 3,
                       "unknown column 'review'"),
    "empty_data": (lambda tmp, ck: {"data__path": str(_bad_tsv(tmp, lambda d: d.iloc[:0]))}, 3,
                   "has no data rows"),
    "empty_texts": (lambda tmp, ck: {"data__path": str(_bad_tsv(
        tmp, lambda d: d.assign(sentence=[""] * 5 + d.sentence.tolist()[5:])))}, 3,
        "expect_column_value_lengths_to_be_between"),
    "labels_outside_set": (lambda tmp, ck: {"data__path": str(_bad_tsv(
        tmp, lambda d: d.assign(label=[7] * 3 + d.label.tolist()[3:])))}, 3,
        "expect_column_values_to_be_in_set"),
    "unknown_family": (lambda tmp, ck: {"model__family": "gpt-9000"}, 2,
                       "unknown model family 'gpt-9000'"),
    "missing_checkpoint": (lambda tmp, ck: {"model__checkpoint": str(tmp / "no-such-ckpt")}, 2,
                           "checkpoint folder does not exist"),
    "invalid_search_range": (lambda tmp, ck: {"tuning__search_space": {
        "learning_rate": {"type": "float", "low": 1e-3, "high": 1e-5}}}, 2,
        "tuning.search_space.learning_rate: Value error, low (0.001) must be < high (1e-05)"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_clear_error_and_nothing_registered(case, mlflow_store, tmp_path,
                                                      tiny_checkpoint):
    make, code, message = BAD_CASES[case]
    pipe = write_pipeline(tmp_path, tiny_checkpoint, **make(tmp_path, tiny_checkpoint))
    res = CliRunner().invoke(main, ["run", str(pipe), "--no-build"])
    assert res.exit_code == code, res.output
    assert message in res.output
    assert registered_versions() == []


def test_malformed_yaml(mlflow_store, tmp_path):
    pipe = tmp_path / "broken.yaml"
    pipe.write_text("name: x\ndata: {path: [unclosed\n")
    res = CliRunner().invoke(main, ["run", str(pipe)])
    assert res.exit_code == 2 and "malformed YAML" in res.output
    assert registered_versions() == []


def test_validation_failure_names_expectation_and_logs_report(mlflow_store, tmp_path,
                                                              tiny_checkpoint):
    bad = _bad_tsv(tmp_path, lambda d: d.assign(label=[0] * len(d)))  # one class only
    pipe = write_pipeline(tmp_path, tiny_checkpoint, data__path=str(bad))
    res = CliRunner().invoke(main, ["run", str(pipe), "--no-build"])
    assert res.exit_code == 3
    assert "data validation failed" in res.output
    client = MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])[0]
    assert run.info.status == "FAILED"
    assert run.data.tags["maas.status"] == "validation_failed"
    result = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="validation/result.json")).read_text())
    assert result["success"] is False
    assert not client.search_runs([run.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    assert registered_versions() == []


@pytest.mark.slow
def test_second_identical_run_while_first_is_live_is_refused(mlflow_store, tmp_path,
                                                             tiny_checkpoint):
    """A RUNNING parent run that belongs to a live process is not 'resumed' by a second
    command: the second one exits 5 and the first finishes normally with one version."""
    import os
    import subprocess
    import sys
    import time

    pipe = write_pipeline(tmp_path, tiny_checkpoint, tuning__n_trials=2, tuning__max_epochs=2)
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(pipe), "--no-build"]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=os.environ.copy(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        client = MlflowClient()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            exp = client.get_experiment_by_name("tiny")
            if exp and client.search_runs([exp.experiment_id],
                                          "tags.`maas.role` = 'pipeline' and "
                                          "attributes.status = 'RUNNING'"):
                break
            time.sleep(0.3)
        assert first.poll() is None, "first run finished before the second could start"
        second = subprocess.run(cmd, cwd=tmp_path, env=os.environ.copy(), capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 5, second.stdout + second.stderr
        assert "already running" in second.stderr
        out, _ = first.communicate(timeout=300)
        assert first.returncode == 0, out[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert len(registered_versions()) == 1


def test_manual_run_refused_while_the_scheduler_holds_the_pipeline(mlflow_store, tmp_path,
                                                                   tiny_checkpoint):
    """The per-pipeline lock `maas schedule` takes for a fire also keeps a manual run out."""
    from pipelines.scheduling.locks import pipeline_lock
    from pipelines.scheduling.records import store_url

    pipe = write_pipeline(tmp_path, tiny_checkpoint)
    lock = pipeline_lock(store_url(mlflow_store), "tiny")
    assert lock.acquire(wait=False)
    try:
        res = CliRunner().invoke(main, ["run", str(pipe), "--no-build"])
        assert res.exit_code == 5, res.output
        assert "already running" in res.output
    finally:
        lock.release()
    assert registered_versions() == []
