"""Packaging and serving, for real: a tiny BERT logged with mlflow.transformers into a fresh SQLite
registry, aliased champion, built into a bento by ``build_bento`` (and once more by the
``bentoml build`` CLI from the kept build context), served by ``bentoml serve`` on 127.0.0.1 and
called over HTTP. The service is also instantiated in-process for the quantised and GPU paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers import tiny_registry

from bentos import BentoSettings, build_bento, parse_model_uri, sanitize_name
from bentos.build import LABEL_DEPLOYMENT, LABEL_NAME, LABEL_VERSION, bentoml_store_scope

MODEL_NAME = "tiny-sentiment"
SETTINGS = BentoSettings(max_batch_size=16, max_latency_ms=5000, max_texts=8, max_chars=200,
                         timeout=30.0, max_concurrency=32)


# -- fixtures: one registry, one bento, one server for the module --------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_checkpoint, mlflow_db_template):
    """A fresh MLflow SQLite store and BentoML home with the tiny model registered @champion."""
    with tiny_registry(tmp_path_factory, tiny_checkpoint, MODEL_NAME, "bentos-store",
                       template=mlflow_db_template) as store:
        yield store


@pytest.fixture(autouse=True)
def _use_store(use_module_store):
    """Point each test at the module's store (other modules' fixtures move the globals)."""


@pytest.fixture(scope="module")
def built(store):
    ctx = store["root"] / "build-context"
    result = build_bento(f"models:/{MODEL_NAME}@champion", SETTINGS, context_dir=ctx)
    return result, ctx


@pytest.fixture(scope="module")
def server(store, built):
    from bentos.server import serve_bento

    result, _ = built
    with serve_bento(result.bento_tag, bentoml_home=store["home"],
                     log_path=store["root"] / "server.log") as srv:
        yield srv


def post(server, payload=None, *, content=None, headers=None, path="/classify"):
    return httpx.post(server.url + path, json=payload, content=content, headers=headers,
                      timeout=30.0)


# -- pure helpers ----------------------------------------------------------------------------
def test_settings_from_mapping_converts_and_rejects():
    s = BentoSettings.from_mapping({"max_batch_size": "8", "quantize": "true",
                                    "timeout": "2.5", "max_tokens": "none"})
    assert (s.max_batch_size, s.quantize, s.timeout, s.max_tokens) == (8, True, 2.5, None)
    with pytest.raises(ValueError, match="unknown bento setting"):
        BentoSettings.from_mapping({"max_batch": 3})
    with pytest.raises(ValueError, match="max_texts"):
        BentoSettings(max_texts=0)
    with pytest.raises(ValueError, match="quantize"):
        BentoSettings.from_mapping({"quantize": "maybe"})


def test_model_uri_and_names():
    assert parse_model_uri("models:/a-b@champion") == ("a-b", "champion", None)
    assert parse_model_uri("models:/a b/3") == ("a b", None, "3")
    with pytest.raises(ValueError, match="models:/NAME@ALIAS"):
        parse_model_uri("runs:/abc/model")
    assert sanitize_name("SST-2 Sentiment!") == "sst-2-sentiment"
    assert len(sanitize_name("x" * 100)) <= 63


# -- build -----------------------------------------------------------------------------------
def test_build_bento_result_and_store(store, built):
    import bentoml

    result, ctx = built
    assert result.model_name == MODEL_NAME and result.model_version == store["version"]
    assert result.alias == "champion" and result.run_id
    assert result.labels == ["negative", "positive"]
    assert result.bento_tag.startswith(f"{MODEL_NAME}:") and result.model_tag
    assert f"bentoml serve {result.bento_tag} --host 127.0.0.1" in result.serve_command
    with bentoml_store_scope():
        bento = bentoml.bentos.get(result.bento_tag)
        model = bentoml.models.get(result.model_tag)
        labels = bento.info.labels
        assert labels[LABEL_NAME] == MODEL_NAME and labels[LABEL_VERSION] == store["version"]
        assert labels[LABEL_DEPLOYMENT] == MODEL_NAME
        assert [str(m.tag) for m in bento.info.services[0].models] == [result.model_tag]
        files = {p.name for p in Path(model.path).iterdir()}
        assert "model.safetensors" in files and "tokenizer.json" in files
        assert not {f for f in files if f.endswith((".bin", ".pt", ".pkl", ".pickle"))}
        config = json.loads((Path(bento.path) / "src" / "bento_config.json").read_text())
    assert config["model_tag"] == result.model_tag
    assert config["settings"]["max_texts"] == SETTINGS.max_texts
    assert config["mlflow"]["mlflow_version"] == store["version"]
    assert {"service.py", "bento_config.json", "bentofile.yaml"} <= {p.name for p in
                                                                      ctx.iterdir()}


@pytest.mark.slow
def test_bentoml_cli_build_from_context(store, built):
    """The kept build context is a plain BentoML project: `bentoml build DIR` builds it."""
    result, ctx = built
    env = {**os.environ, "BENTOML_HOME": str(store["home"]), "BENTOML_DO_NOT_TRACK": "True"}
    proc = subprocess.run([sys.executable, "-m", "bentoml", "build", str(ctx), "--output",
                           "tag"], check=False, env=env, capture_output=True, text=True,
                          timeout=180,
                          cwd=store["root"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    tag = proc.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith(f"{MODEL_NAME}:") and tag != result.bento_tag


def test_build_rejects_unknown_alias(store):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        build_bento(f"models:/{MODEL_NAME}@nosuchalias", SETTINGS)


# -- serving over HTTP -----------------------------------------------------------------------
@pytest.mark.slow
def test_classify_batch(server):
    texts = ["a gorgeous, witty film", "a dull mess", "fine."]
    r = post(server, {"texts": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body, list) and len(body) == len(texts)
    for item in body:
        assert set(item) == {"label", "probabilities"}
        assert set(item["probabilities"]) == {"negative", "positive"}
        assert sum(item["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert item["label"] == max(item["probabilities"], key=item["probabilities"].get)
    # the same text alone gives the same answer as inside a padded batch
    alone = post(server, {"texts": [texts[1]]}).json()[0]
    assert alone["probabilities"]["positive"] == pytest.approx(
        body[1]["probabilities"]["positive"], abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("payload, limit", [
    ({"texts": []}, "max_texts=8"),
    ({"texts": ["ok"] * 9}, "max_texts=8"),
    ({"texts": ["ok", 3]}, "must be a string"),
    ({"texts": ["ok", None]}, "must be a string"),
    ({"texts": ["ok", "   "]}, "whitespace"),
    ({"texts": [""]}, "whitespace"),
    ({"texts": ["x" * 201]}, "max_chars=200"),
    ({"texts": "not a list"}, "array"),
    ({}, "texts"),
], ids=["empty", "too-many", "int", "null", "blank", "empty-text", "too-long", "not-list",
        "missing"])
def test_bad_input_is_4xx_naming_the_limit(server, payload, limit):
    r = post(server, payload)
    assert r.status_code == 400, r.text
    assert limit in r.text


@pytest.mark.slow
def test_non_utf8_and_non_json_bodies(server):
    r = post(server, content=b'{"texts": ["\xff\xfe bad"]}',
             headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.text
    r = post(server, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = post(server, content=b"texts=a", headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.text


@pytest.mark.slow
def test_oversized_body_is_413(server):
    big = json.dumps({"texts": ["x" * 200] * 8, "pad": "y" * 400_000}).encode()
    r = post(server, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_texts=8" in r.text


@pytest.mark.slow
@pytest.mark.parametrize("media_type", [
    "application/x-pickle", "application/pickle", "application/python-pickle",
    "application/vnd.bentoml+pickle", "Application/X-Pickle; charset=binary",
])
@pytest.mark.parametrize("path", ["/classify", "/metadata"])
def test_pickle_bodies_are_415(server, media_type, path):
    import pickle

    r = post(server, content=pickle.dumps({"texts": ["a"]}), headers={"content-type": media_type},
             path=path)
    assert r.status_code == 415, r.text
    assert "pickle" in r.json()["error"]


@pytest.mark.slow
def test_metadata(server, built, store):
    result, _ = built
    r = httpx.get(server.url + "/metadata", timeout=10)
    assert r.status_code == 200
    meta = r.json()
    assert meta["model_name"] == MODEL_NAME and meta["model_version"] == store["version"]
    assert meta["run_id"] == result.run_id and meta["alias"] == "champion"
    assert meta["labels"] == ["negative", "positive"]
    assert meta["bento_tag"] == result.bento_tag and meta["bento_model_tag"] == result.model_tag
    assert meta["device"] == "cpu" and meta["dtype"] == "float32" and meta["quantize"] is False
    # a version without variant tags (registered before variants) serves its fp32 model
    assert (meta["variant"], meta["runtime"]) == ("fp32", "torch")
    # torch_threads unset: the worker's torch uses all the cores it has (cores // workers)
    assert meta["providers"] == [] and meta["workers"] == 1
    assert meta["threads"] == max(1, len(os.sched_getaffinity(0)) // meta["workers"])
    assert (meta["max_texts"], meta["max_chars"], meta["max_batch_size"]) == (8, 200, 16)
    assert httpx.post(server.url + "/metadata", timeout=10).json() == meta


@pytest.mark.slow
def test_health_and_metrics(server):
    assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200
    assert httpx.get(server.url + "/livez", timeout=10).status_code == 200
    assert post(server, {"texts": ["counted"]}).status_code == 200
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    counters = [line for line in metrics.splitlines()
                if line.startswith("bentoml_service_request_total")
                and 'endpoint="/classify"' in line and 'http_response_code="200"' in line]
    assert counters and float(counters[0].rsplit(" ", 1)[1]) >= 1
    assert "maas_classify_batch_texts_count" in metrics
    assert "bentoml_service_adaptive_batch_size" in metrics


# -- the service in-process: quantised CPU path and GPU path ---------------------------------
@pytest.fixture
def _restore_torch_threads():
    """An in-process service sets torch's global thread count: put it back for later tests."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _service_instance(built, **settings):
    """The bento's TextClassifier instantiated in this process with changed settings."""
    from bentos.testing import load_service

    result, _ = built
    return load_service(result.bento_tag, **settings)


def test_quantized_service_in_process(store, built, _restore_torch_threads):
    import torch

    _, plain = _service_instance(built)
    cores = len(os.sched_getaffinity(0))
    assert plain.info["threads"] == cores and torch.get_num_threads() == cores  # the default
    threads = 1 if cores != 1 else 2  # a count torch is not at now
    _, quant = _service_instance(built, quantize=True, torch_threads=threads)
    assert quant.quantized and quant.info["quantize"] is True
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized.dynamic")
               for m in quant.classifier.modules())
    texts = ["a gorgeous, witty film", "a dull mess"]
    a, b = plain.predict_texts(texts), quant.predict_texts(texts)
    for x, y in zip(a, b, strict=True):
        assert sum(y["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert y["probabilities"]["positive"] == pytest.approx(
            x["probabilities"]["positive"], abs=0.05)
    assert plain.info["device"] == "cpu"
    # torch_threads is applied: torch's (process-wide) thread count is the setting
    assert quant.info["threads"] == threads and torch.get_num_threads() == threads


@pytest.mark.gpu
def test_gpu_service_uses_half_precision(store, built, _restore_torch_threads):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    module, svc = _service_instance(built, quantize=True)
    assert module.HAS_CUDA and svc.device.type == "cuda"
    assert svc.dtype in (torch.bfloat16, torch.float16)
    assert svc.quantized is False  # int8 dynamic quantisation is CPU-only
    out = svc.predict_texts(["a gorgeous, witty film", "a dull mess"] * 8)
    assert len(out) == 16
    assert all(sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-3) for p in out)
    assert svc.info["device"].startswith("cuda") and svc.info["dtype"] in ("bfloat16", "float16")
