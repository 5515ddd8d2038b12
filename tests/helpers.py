"""Plain helper functions shared by the test modules (fixtures live in conftest.py): pipeline
files written on the fly, a tiny registered classifier, an echo pyfunc model, the data defects
the validation suite must catch, fresh PostgreSQL databases, free ports, environment
save/restore, a start gate for racing processes, and a real ``mlflow server`` with the
client-side plumbing to talk to it.

Imported as ``from helpers import ...``: pytest's default ``prepend`` import mode puts ``tests/``
(the folder of conftest.py and the test modules, which has no ``__init__.py``) on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import uuid
import warnings
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO / "data" / "sst2"
SST2_TRAIN = SST2 / "train_sample.tsv"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
#: the basic-auth app's admin password (the ``auth_server`` fixture), one per test session
ADMIN_PASSWORD = "maas-admin-" + uuid.uuid4().hex[:12]


# -- pipeline files and a registered model ----------------------------------------------------
def write_pipeline(folder: Path, checkpoint: Path, **overrides) -> Path:
    """A small, fast pipeline on the SST-2 slice with the tiny checkpoint; dotted overrides."""
    cfg = {
        "name": "tiny",
        "data": {"path": str(SST2 / "train_sample.tsv"), "format": "tsv",
                 "text_column": "sentence", "label_column": "label",
                 "label_names": {0: "negative", 1: "positive"}, "max_rows": 400,
                 "split": {"validation": 0.25, "test": 0.25, "seed": 1}},
        "validation": {"suite": "sentiment"},
        "model": {"family": "text_classifier", "checkpoint": str(checkpoint), "max_length": 32},
        "tuning": {"n_trials": 2, "max_epochs": 2, "sampler_seed": 7,
                   "pruner": {"type": "median", "n_startup_trials": 1},
                   "search_space": {"learning_rate": {"type": "float", "low": 1e-4,
                                                      "high": 1e-3, "log": True}},
                   "fixed": {"batch_size": 32}},
        "metric": "accuracy",
        "promotion": {"metric": "accuracy", "min_delta": 0.0, "thresholds": {}},
        "registry": {"model_name": "tiny-sentiment"},
        "bento": {"enabled": False},
        "compression": {"enabled": False},  # tests/test_compression.py turns it on
    }
    for dotted, value in overrides.items():
        node = cfg
        keys = dotted.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def fresh_mlflow_db(template: Path, path: Path) -> str:
    """A new, empty MLflow SQLite store at ``path``: a copy of the session's migrated
    ``mlflow_db_template`` (conftest.py). Returns its tracking URI."""
    import shutil

    shutil.copyfile(template, path)
    return f"sqlite:///{path}"


@contextlib.contextmanager
def module_store(tmp_path_factory, prefix: str, template: Path | None = None):
    """A fresh MLflow SQLite store (a copy of ``template`` when given: the session's
    ``mlflow_db_template``) + BentoML home in a new folder, with the cwd, the environment and
    MLflow's tracking URI pointed at them for the block; yields {root, uri, home}."""
    import mlflow

    root = tmp_path_factory.mktemp(prefix)
    uri = (fresh_mlflow_db(template, root / "mlflow.db") if template is not None
           else f"sqlite:///{root / 'mlflow.db'}")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("BENTOML_HOME", str(root / "bentoml"))
        mp.setenv("BENTOML_DO_NOT_TRACK", "True")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("tests")  # not an experiment id left active by an earlier test
        yield {"root": root, "uri": uri, "home": root / "bentoml"}


@contextlib.contextmanager
def tiny_registry(tmp_path_factory, checkpoint: Path, model_name: str, prefix: str,
                  template: Path | None = None):
    """:func:`module_store` with the tiny classifier registered as ``model_name@champion``;
    yields {root, uri, home, version}."""
    from bentos.testing import load_classifier, register_classifier

    with module_store(tmp_path_factory, prefix, template) as store:
        model, tok = load_classifier(checkpoint)
        yield {**store, "version": register_classifier(model, tok, model_name)}


def maas(*args: Any, catch: bool = False, env: dict[str, str | None] | None = None):
    """``maas ARGS`` in this process (Click's runner): for what the CLI parses and prints, not a
    process boundary. ``catch``: an unexpected exception becomes the result's ``exception``
    (exit 1) instead of failing the test; ``env``: variables for the call (None removes one)."""
    from click.testing import CliRunner

    from pipelines.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=catch)


# -- data defects (tests/test_validation.py, tests/test_suite_init.py) -------------------------
def set_values(rows, col, value):
    """A mutator: ``col`` set to ``value`` on ``rows`` (a copy; the column becomes object)."""
    def f(df):
        df = df.copy()
        df[col] = df[col].astype(object)
        for r in rows:
            df.at[r, col] = value
        return df
    return f


def imbalance_95_5(df):
    """The 2,000-row slice relabelled 95% positive / 5% negative (a copy)."""
    df = df.copy()
    df["label"] = [1] * 1900 + [0] * 100
    return df


def duplicate_30pct(df):
    """30% of the 2,000 rows repeat texts from the first 600 rows (a copy)."""
    df = df.copy()
    df.loc[1400:, "text"] = df.text.iloc[:600].to_numpy()
    return df


DEFECTS = {
    # name: (mutate, failing expectation type, column, kwargs subset, example (row, value) or None)
    "empty_text": (set_values([3, 17], "text", ""), "expect_column_value_lengths_to_be_between",
                   "text", {}, (3, "")),
    "none_text": (set_values([8], "text", None), "expect_column_values_to_not_be_null", "text",
                  {}, (8, None)),
    "nan_text": (set_values([9], "text", float("nan")), "expect_column_values_to_not_be_null",
                 "text", {}, (9, None)),
    "label_7": (set_values([5], "label", 7), "expect_column_values_to_be_in_set", "label", {},
                (5, 7)),
    "single_class": (lambda d: d.assign(label=0), "expect_column_values_to_not_be_in_set",
                     "label", {"value_set": [0]}, (0, 0)),
    "imbalance_95_5": (imbalance_95_5, "expect_column_values_to_not_be_in_set", "label",
                       {"value_set": [1]}, (0, 1)),
    "too_few_rows": (lambda d: d.iloc[:60], "expect_table_row_count_to_be_between", None, {},
                     None),
    "duplicates_30pct": (duplicate_30pct,
                         "expect_column_proportion_of_unique_values_to_be_between", "text", {},
                         None),
    "over_long_text": (set_values([11], "text", "so " * 500),
                       "expect_column_value_lengths_to_be_between", "text", {}, (11, None)),
}


# -- PostgreSQL and processes -----------------------------------------------------------------
def _pg_available() -> bool:
    import sqlalchemy as sa

    try:
        with sa.create_engine(PG_ADMIN).connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return True
    except sa.exc.SQLAlchemyError:  # refused, no such role/database...
        return False


@contextlib.contextmanager
def fresh_pg_database(prefix: str = "maas_test"):
    """A new database on the machine's PostgreSQL (127.0.0.1:5432; .ci/run starts it when it is
    down), dropped with FORCE afterwards; yields its URL."""
    import sqlalchemy as sa

    if not _pg_available():
        pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432 (start it: see .ci/run)")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def communicate_all(procs: list, timeout: float) -> list[tuple[int, str, str]]:
    """(returncode, stdout, stderr) of each process (text pipes); leftovers are killed."""
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the product's own helper, which ``bentos.server`` uses)."""
    from bentos.server import free_port as product_free_port

    return product_free_port("127.0.0.1")


class QuietJSONHandler(http.server.BaseHTTPRequestHandler):
    """Base of the tests' small HTTP peers on 127.0.0.1: no access log, JSON answers."""

    def answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def local_http_server(handler: type[http.server.BaseHTTPRequestHandler],
                      ) -> http.server.ThreadingHTTPServer:
    """``handler`` served on 127.0.0.1 (a free port: ``.server_address[1]``) by a daemon thread;
    ``shutdown()`` then ``server_close()`` end it."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def restore_env(saved: dict[str, str | None]) -> None:
    """Put environment variables back as ``{name: value}`` saved them (None: was unset)."""
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group of ``proc`` (server workers, job runners), then SIGKILL."""
    from bentos.processes import stop_group

    try:
        os.getpgid(proc.pid)
    except ProcessLookupError:  # already reaped: nothing to stop
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        stop_group(proc, grace_s, whole_group=True, reap_s=10, poll_s=0.2)


# -- a start gate for racing processes --------------------------------------------------------
#: Lines a racing child script runs once its imports are done: touch the ready file named by
#: ``sys.argv[1]``, then block until the test writes the go line to its stdin (``open_gate``).
GATE = ("import pathlib as _gate_p, sys as _gate_s\n"
        "_gate_p.Path(_gate_s.argv[1]).touch()\n"
        "_gate_s.stdin.readline()\n")


def open_gate(procs: list[subprocess.Popen], ready: list[Path], timeout_s: float = 180.0) -> None:
    """Wait until every child has touched its ready file (all imported, none started), then
    release them together: one go line to each stdin (``stdin=PIPE``, text mode). Fails with the
    files still missing, or with the output of a child that exited before the gate; on failure
    every child is killed."""
    deadline = time.monotonic() + timeout_s
    try:
        while missing := [p.name for p in ready if not p.exists()]:
            for proc in procs:
                if proc.poll() is not None:
                    out, err = proc.communicate()
                    pytest.fail(f"{proc.args} exited with {proc.returncode} before the start "
                                f"gate:\n{(out or '')[-1000:]}{(err or '')[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"not ready after {timeout_s:.0f} s: {missing}")
            time.sleep(0.05)
    except BaseException:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        raise
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()


# -- a real MLflow tracking server -------------------------------------------------------------
class Server:
    """A running ``mlflow server``: its URL, artifacts destination, log and process."""

    def __init__(self, url: str, port: int, artifacts: Path, log: Path, proc: subprocess.Popen,
                 backend: str):
        self.url, self.port, self.artifacts, self.log = url, port, artifacts, log
        self.proc, self.backend = proc, backend

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


#: MLflow's SQL-store connection pool in processes the tests start on PostgreSQL (servers, tuning
#: workers): the server allows 100 connections, and with two xdist workers two PostgreSQL-heavy
#: modules run at once; MLflow's default pool (5 + 10 overflow per process and server worker) ran
#: it out ("too many clients already") in test_distributed while the shared servers were up
PG_POOL_ENV = {"MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": "1", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": "2"}
#: A server answers many clients at once (eight parallel registrations): 1 + 2 per server worker
#: timed out in CI ("QueuePool limit of size 1 overflow 2 reached"); 3 + 5 per worker, 16 per
#: two-worker server, still fits several servers in PostgreSQL's default 100
SERVER_PG_POOL_ENV = {"MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": "3",
                      "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": "5"}


@contextlib.contextmanager
def mlflow_server(folder: Path, backend: str, *, auth_config: Path | None = None,
                  workers: int = 2, start_timeout_s: float = 180.0,
                  env: dict[str, str] | None = None) -> Iterator[Server]:
    """``mlflow server`` on ``backend`` with proxied artifacts under ``folder/artifacts``.

    Bound to 127.0.0.1 on a free port; waits for ``/health``; the whole process group is killed
    on exit. ``auth_config``: start the basic-auth app with that config file. ``env``: extra
    variables for the server process.
    """
    artifacts = folder / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = folder / f"mlflow-server-{port}.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
           "--artifacts-destination", str(artifacts), "--host", "127.0.0.1",
           "--port", str(port), "--workers", str(workers)]
    env = {**os.environ, **SERVER_PG_POOL_ENV,
           # the GenAI job runner (huey consumers) is not needed here: 8 fewer processes
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(k, None)
    if auth_config is not None:
        cmd += ["--app-name", "basic-auth"]
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(auth_config)
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = uuid.uuid4().hex
    with open(log, "w") as fh:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", port, artifacts, log, proc, backend)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                status, _ = request(server, "GET", "/health", timeout=2)
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy in {start_timeout_s:.0f} s:\n"
                            f"{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        kill_group(proc)


def request(server: Server, method: str, path: str, body: bytes | dict | None = None,
            auth: tuple[str, str] | None = None, timeout: float = 30) -> tuple[int, bytes]:
    """One raw HTTP request; ``path`` goes on the wire exactly as given (no normalisation)."""
    headers = {}
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if auth is not None:
        headers["Authorization"] = "Basic " + b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def client_env(server: Server, **extra: str) -> dict[str, str]:
    """This process's environment for a child that talks to ``server`` (credentials only when
    given in ``extra``)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url, **extra}
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        if k not in extra:
            env.pop(k, None)
    return env


@contextlib.contextmanager
def tracking_to(uri: str, **env: str) -> Iterator[None]:
    """Point this process's MLflow client at ``uri`` (and credentials) for the block."""
    import mlflow

    previous_uri = mlflow.get_tracking_uri()
    # patch.dict puts the environment back as it was on exit, after the finally below (whose
    # set_tracking_uri writes MLFLOW_TRACKING_URI)
    with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": uri, **env}):
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            if mlflow.active_run():
                mlflow.end_run()
            mlflow.set_tracking_uri(previous_uri)


def log_echo_model(experiment: str) -> tuple[str, str]:
    """Log a tiny pyfunc model (echoes its input) in a new run; returns (model_uri, run_id)."""
    import mlflow
    import mlflow.pyfunc

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: list[str], params=None) -> list[str]:
            return model_input

    mlflow.set_experiment(experiment)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mlflow.start_run() as run:
            info = mlflow.pyfunc.log_model(name="model", python_model=Echo(),
                                           pip_requirements=[])
    return info.model_uri, run.info.run_id


def made_once_per_run(tmp_path_factory, name: str, make) -> Path:
    """``make(folder)`` once per test run, even with pytest-xdist: the workers share the run's
    base temporary folder and take a file lock (the pattern pytest-xdist documents); the first
    one makes the folder, the others wait for it and reuse it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this run
    out, done = root / name, root / f"{name}.complete"
    with FileLock(str(out) + ".lock"):
        if not done.exists():
            out.mkdir(parents=True, exist_ok=True)
            make(out)
            done.touch()
    return out
