"""Hardening: credentials never printed, tagged or written; errors land on the documented exit
codes with a message that says what is wrong; a failed gate's data docs outlive the command."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import SST2, maas, write_pipeline

from pipelines.redact import redact


@pytest.mark.parametrize("raw, expected", [
    ("http://alice:s3cr3t@mlflow.example:5000", "http://alice:***@mlflow.example:5000"),
    ("postgresql+psycopg2://u:p%40ss@db:5432/optuna", "postgresql+psycopg2://u:***@db:5432/optuna"),
    ("sqlite:////tmp/o.db?password=CANARY", "sqlite:////tmp/o.db?password=***"),
    ("postgresql://h/db?sslmode=require&PassWord=x1&application_name=m",
     "postgresql://h/db?sslmode=require&PassWord=***&application_name=m"),
    ("https://h/x?Token=abc&secret=def&access_key=ghi",
     "https://h/x?Token=***&secret=***&access_key=***"),
    ("s3://b/k?X-Amz-Signature=abc&x=1", "s3://b/k?X-Amz-Signature=***&x=1"),
    ("host=db port=5432 user=u password=pw1 dbname=o",
     "host=db port=5432 user=u password=*** dbname=o"),
    ("host=db PASSWORD='two words' sslmode=require", "host=db PASSWORD=*** sslmode=require"),
    ("error talking to http://bob:pw@h:1/api: 403",
     "error talking to http://bob:***@h:1/api: 403"),
])
def test_redact_masks_credentials(raw, expected):
    assert redact(raw) == expected


@pytest.mark.parametrize("clean", [
    "sqlite:///mlflow.db", "sqlite:////abs/path/optuna.db", "http://127.0.0.1:5000",
    "https://alice@mlflow.example/x", "postgresql://postgres@127.0.0.1:5432/optuna?sslmode=require",
    "file:///tmp/mlruns", "models:/name@champion", "a sentence with passwords=3 in it", "",
])
def test_redact_leaves_urls_without_credentials_alone(clean):
    assert redact(clean) == clean


def test_summary_masks_tracking_uri_userinfo():
    from pipelines.cli import _summary
    from pipelines.run import RunResult

    r = RunResult("p", "rid", "1", "http://alice:CANARY3@tracking:5000",
                  test_metrics={"accuracy": 1.0}, decision_reason="x")
    out = _summary(r)
    assert "CANARY3" not in out and "http://alice:***@tracking:5000" in out


def test_log_records_are_redacted():
    import logging

    from pipelines.redact import RedactingFilter

    record = logging.LogRecord("maas", logging.INFO, __file__, 1, "storage %s ready",
                               ("postgresql://u:CANARY7@h/db?token=CANARY8",), None)
    assert RedactingFilter().filter(record)
    assert record.getMessage() == "storage postgresql://u:***@h/db?token=*** ready"


def _leaks(root: Path, canaries: list[bytes], skip: set[Path]) -> list[str]:
    found = []
    for p in root.rglob("*"):
        if p in skip or not p.is_file():
            continue
        data = p.read_bytes()
        found += [f"{p}: {c.decode()}" for c in canaries if c in data]
    return found


@pytest.mark.slow
def test_pipeline_run_writes_no_credentials(mlflow_store, tmp_path, tiny_checkpoint):
    """Secrets in the Optuna storage URL's query and in the tracking URI's query: nothing in the
    tracking DB, the Optuna DB, the artifact tree or the CLI output contains them."""
    tracking = f"{mlflow_store}?password=CANARY2"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}?password=CANARY1"
    pipe = write_pipeline(tmp_path, tiny_checkpoint, tuning__n_trials=1, tuning__max_epochs=1,
                          tracking_uri=tracking)
    res = maas("run", str(pipe), "--no-build", "--storage", storage)
    assert res.exit_code == 0, res.output
    assert "CANARY" not in res.output
    assert "password=***" in res.output  # the summary shows the masked tracking URI
    assert (tmp_path / "mlflow.db").stat().st_size > 0 and (tmp_path / "optuna.db").is_file()
    leaks = _leaks(tmp_path, [b"CANARY1", b"CANARY2"], skip={pipe})
    assert leaks == []
    # file names too: the artifact tree and the lock files beside the sqlite databases
    assert (tmp_path / "mlruns").is_dir()
    assert [p for p in tmp_path.rglob("*CANARY*")] == []
    assert not (tmp_path / "maas-data-docs").exists(), "a passing gate keeps no local docs"
    from mlflow import MlflowClient

    client = MlflowClient()
    run = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                             "tags.`maas.role` = 'pipeline'")[0]
    assert run.data.tags["optuna.storage"].endswith("optuna.db?password=***")


def test_malformed_set_value_is_a_config_error(mlflow_store, tmp_path, tiny_checkpoint):
    pipe = write_pipeline(tmp_path, tiny_checkpoint)
    res = maas("run", str(pipe), "--no-build", "--set", "tuning.n_trials=[unclosed")
    assert res.exit_code == 2, res.output
    assert "tuning.n_trials" in res.output and "Traceback" not in res.output


def test_data_path_directory_and_fifo(mlflow_store, tmp_path, tiny_checkpoint):
    folder = tmp_path / "data_dir"
    folder.mkdir()
    res = maas("run", str(write_pipeline(tmp_path, tiny_checkpoint, data__path=str(folder))))
    assert res.exit_code == 3, res.output
    assert "is a directory" in res.output and "not found" not in res.output
    fifo = tmp_path / "data.tsv"
    os.mkfifo(fifo)
    res = maas("run", str(write_pipeline(tmp_path, tiny_checkpoint, data__path=str(fifo))))
    assert res.exit_code == 3, res.output
    assert "is not a regular file (FIFO)" in res.output


def test_failed_gate_prints_data_docs_that_exist(mlflow_store, tmp_path, tiny_checkpoint):
    import pandas as pd

    df = pd.read_csv(SST2 / "train_sample.tsv", sep="\t").head(200)
    bad = tmp_path / "one_class.tsv"
    df.assign(label=0).to_csv(bad, sep="\t", index=False)
    res = maas("run", str(write_pipeline(tmp_path, tiny_checkpoint, data__path=str(bad))),
                 "--no-build")
    assert res.exit_code == 3, res.output
    line = next(ln for ln in res.output.splitlines() if "data docs:" in ln)
    index = Path(line.split("data docs:", 1)[1].strip())
    assert index.is_file() and index.name == "index.html"
    assert (tmp_path / "maas-data-docs") in index.parents


def test_tracking_permission_denied_is_exit_4():
    """A real MlflowException as the tracking server raises it for a 403 maps to exit 4."""
    import click
    from mlflow.exceptions import MlflowException

    from pipelines.cli import _errors

    @click.command()
    @_errors
    def cmd() -> None:
        raise MlflowException("API request to endpoint /api/2.0/mlflow/experiments/create "
                              "failed with error code 403 != 200. Response body: 'Permission "
                              "denied' (http://bob:CANARY4@tracking:5000)",
                              error_code="PERMISSION_DENIED")

    res = CliRunner().invoke(cmd, [])
    assert res.exit_code == 4, res.output
    assert "permission denied on the tracking server" in res.output
    assert "CANARY4" not in res.output and "Traceback" not in res.output


def test_open_experiment_names_the_experiment_on_403(monkeypatch):
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipelines import run as run_mod
    from pipelines.config import PipelineConfig

    def refuse(name):
        raise MlflowException("failed with error code 403 != 200", error_code="PERMISSION_DENIED")

    monkeypatch.setattr(mlflow, "set_experiment", refuse)
    monkeypatch.setattr(run_mod, "configure_tracking", lambda cfg: "http://bob:CANARY5@h:1")
    cfg = PipelineConfig.model_construct(name="alices-exp")
    with pytest.raises(run_mod.TrackingPermissionDenied) as err:
        run_mod.open_experiment(cfg)
    assert "alices-exp" in str(err.value) and "CANARY5" not in str(err.value)


@pytest.mark.slow
def test_other_users_experiment_is_permission_denied_exit_4(auth_server, tmp_path,
                                                            tiny_checkpoint):
    """On the basic-auth tracking server, bob runs a pipeline whose experiment alice owns: exit 4
    naming the permission, no traceback; bob's password (in the tracking URI) is not printed."""
    import subprocess
    import sys
    import uuid
    from urllib.parse import urlparse

    from helpers import ADMIN_PASSWORD, client_env, tracking_to
    from mlflow.server import get_app_client

    srv = auth_server
    alice, bob = f"alice-{uuid.uuid4().hex[:6]}", f"bob-{uuid.uuid4().hex[:6]}"
    alice_pw, bob_pw = uuid.uuid4().hex, "CANARY6" + uuid.uuid4().hex
    with tracking_to(srv.url, MLFLOW_TRACKING_USERNAME="admin",
                     MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD):
        admin = get_app_client("basic-auth", tracking_uri=srv.url)
        admin.create_user(alice, alice_pw)
        admin.create_user(bob, bob_pw)
    experiment = f"exp-{alice}"
    with tracking_to(srv.url, MLFLOW_TRACKING_USERNAME=alice, MLFLOW_TRACKING_PASSWORD=alice_pw):
        import mlflow

        mlflow.set_experiment(experiment)  # alice owns it; bob has no grant
    u = urlparse(srv.url)
    pipe = write_pipeline(tmp_path, tiny_checkpoint, name=experiment,
                          tracking_uri=f"{u.scheme}://{bob}:{bob_pw}@{u.netloc}")
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(pipe), "--no-build"],
                          cwd=tmp_path, env=client_env(srv), capture_output=True, text=True,
                          timeout=300, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 4, out[-3000:]
    assert "permission denied on the tracking server" in out and experiment in out
    assert "Traceback" not in out and "CANARY6" not in out


def test_unexpected_error_traceback_is_redacted():
    """A crash outside the mapped errors still prints its traceback (exit 1), credentials
    masked: the CLI installs a redacting excepthook in a real process."""
    import subprocess
    import sys

    code = ("import sys; from pipelines.cli import _setup_logging; _setup_logging(False); "
            "raise RuntimeError('cannot reach postgresql://u:CANARY9@db/x?token=CANARY9')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "RuntimeError" in proc.stderr
    assert "CANARY9" not in proc.stderr
