"""The ``bentoml`` MLflow deployments target, through ``mlflow.deployments.get_deploy_client`` and
the ``mlflow deployments run-local`` CLI (entry point from pyproject), on a tiny registered model
in a fresh SQLite registry and BentoML home."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import tiny_registry
from mlflow.exceptions import MlflowException

MODEL_NAME = "tiny-plugin"
URI = f"models:/{MODEL_NAME}@champion"


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_checkpoint, mlflow_db_template):
    """A fresh MLflow SQLite store and BentoML home with the tiny model registered @champion."""
    with tiny_registry(tmp_path_factory, tiny_checkpoint, MODEL_NAME, "plugin-store",
                       template=mlflow_db_template) as store:
        yield store


@pytest.fixture
def client(store, monkeypatch):
    import mlflow
    from mlflow.deployments import get_deploy_client

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.setenv("BENTOML_HOME", str(store["home"]))
    monkeypatch.delenv("MAAS_BENTOML_URL", raising=False)
    mlflow.set_tracking_uri(store["uri"])
    return get_deploy_client("bentoml")


def _error_code(exc: MlflowException) -> str:
    return exc.error_code


def test_target_is_registered_and_documented(client):
    import mlflow.deployments
    from mlflow.deployments import BaseDeploymentClient

    from bentos import mlflow_plugin

    assert isinstance(client, BaseDeploymentClient)
    assert type(client).__name__ == "BentoMLDeploymentClient"
    help_text = mlflow_plugin.target_help()
    assert "max_batch_size" in help_text and "models:/NAME@ALIAS" in help_text
    # MLflow's own run_local finds the plugin's run_local through the entry point and calls it
    # as run_local(name, model_uri, flavor, config): a bad name is refused before any build
    with pytest.raises(MlflowException, match="not a valid BentoML name") as err:
        mlflow.deployments.run_local("bentoml", "Bad Name", URI)
    assert _error_code(err.value) == "INVALID_PARAMETER_VALUE"


@pytest.mark.slow
def test_create_list_update_predict_delete(client, store):
    import bentoml

    from bentos.build import bentoml_store_scope
    from bentos.server import serve_bento

    d = client.create_deployment("sentiment", URI,
                                 config={"max_batch_size": "8", "max_texts": "4",
                                         "max_latency_ms": "5000"})
    assert d["name"] == "sentiment" and d["bento_tag"].startswith("sentiment:")
    assert (d["model_name"], d["model_version"], d["alias"]) == (MODEL_NAME, store["version"],
                                                                 "champion")
    assert d["settings"]["max_batch_size"] == 8 and d["settings"]["max_texts"] == 4
    assert d["model_uri"] == URI and d["flavor"] == "transformers"
    assert d["versions"] == [d["bento_tag"]]
    with pytest.raises(MlflowException) as err:
        client.create_deployment("sentiment", URI)
    assert _error_code(err.value) == "RESOURCE_ALREADY_EXISTS"
    assert "sentiment" in [x["name"] for x in client.list_deployments()]

    u = client.update_deployment("sentiment", config={"max_texts": "3"})
    assert u["bento_tag"] != d["bento_tag"] and len(u["versions"]) == 2
    assert u["settings"]["max_texts"] == 3 and u["settings"]["max_batch_size"] == 8
    assert client.get_deployment("sentiment")["bento_tag"] == u["bento_tag"]

    with serve_bento(u["bento_tag"], bentoml_home=store["home"]) as srv:
        texts = ["a gorgeous film", "a dull mess", "ok", "fine", "meh"]  # > max_texts: chunked
        out = client.predict("sentiment", texts, endpoint=srv.url)
        preds = out["predictions"]
        assert len(preds) == len(texts)
        assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-5 for p in preds)
        import pandas as pd

        df = client.predict(endpoint=srv.url, inputs=pd.DataFrame({"text": texts[:2]}))
        assert [p["label"] for p in df["predictions"]] == [p["label"] for p in preds[:2]]
        with pytest.raises(MlflowException, match="400"):
            client.predict(endpoint=srv.url, inputs=["   "])

    client.delete_deployment("sentiment")
    with pytest.raises(MlflowException) as err:
        client.get_deployment("sentiment")
    assert _error_code(err.value) == "RESOURCE_DOES_NOT_EXIST"
    with bentoml_store_scope():
        assert not [b for b in bentoml.bentos.list() if b.tag.name == "sentiment"]
        assert not [m for m in bentoml.models.list()
                    if m.info.labels.get("maas.deployment") == "sentiment"]
    client.delete_deployment("sentiment")  # deleting again is a no-op


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "Bad Name", "model_uri": URI}, "not a valid BentoML name"),
    ({"name": "ok-name", "model_uri": URI, "config": {"max_batch": 3}}, "unknown bento setting"),
    ({"name": "ok-name", "model_uri": URI, "config": {"quantize": "perhaps"}}, "boolean"),
    ({"name": "ok-name", "model_uri": URI, "flavor": "sklearn"}, "not supported"),
    ({"name": "ok-name", "model_uri": "runs:/abc/model"}, "models:/NAME@ALIAS"),
])
def test_create_rejects_bad_arguments(client, kwargs, match):
    with pytest.raises(MlflowException, match=match) as err:
        client.create_deployment(**kwargs)
    assert _error_code(err.value) == "INVALID_PARAMETER_VALUE"
    assert "ok-name" not in [x["name"] for x in client.list_deployments()]


def test_predict_needs_a_server(client):
    with pytest.raises(MlflowException, match="endpoint"):
        client.predict(inputs=["a"])


@pytest.mark.slow
def test_run_local_via_mlflow_cli(client, store):
    """`mlflow deployments run-local -t bentoml` builds the bento and serves it; predict then uses
    the url recorded in the deployment config."""
    from bentos.server import QUIET_ENV, free_port, stop_process, wait_ready

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, **QUIET_ENV, "MLFLOW_TRACKING_URI": store["uri"],
           "BENTOML_HOME": str(store["home"])}
    log_path = store["root"] / "run-local.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "deployments", "run-local", "-t", "bentoml",
             "--name", "local", "-m", URI, "-C", f"port={port}", "-C", f"url={url}",
             "-C", "max_latency_ms=5000"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True, cwd=store["root"])
        try:
            wait_ready(url, proc, 150, log_path)
            d = client.get_deployment("local")
            assert d["url"] == url and d["settings"]["max_latency_ms"] == 5000
            out = client.predict("local", {"texts": ["a gorgeous film"]})
            assert len(out["predictions"]) == 1
        finally:
            stop_process(proc)
    client.delete_deployment("local")
