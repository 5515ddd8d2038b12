"""End to end as a user runs it: `maas run` (subprocess, real SQLite MLflow store, real Optuna
study, real GX gate, tiny BERT) -> version registered -> champion alias -> bento built ->
the summary's `bentoml serve` command on 127.0.0.1 -> real HTTP predictions -> a bad request
4xx."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import httpx
import pytest
from helpers import write_pipeline
from mlflow import MlflowClient

pytestmark = pytest.mark.slow


def test_run_build_serve_predict(tmp_path, tiny_checkpoint, monkeypatch):
    import mlflow

    home = tmp_path / "bentoml"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "BENTOML_HOME": str(home)}
    pipe = write_pipeline(tmp_path, tiny_checkpoint, tuning__n_trials=1, tuning__max_epochs=1,
                          bento={"enabled": True, "max_batch_size": 8, "max_latency_ms": 2000,
                                 "max_texts": 4, "max_chars": 100, "timeout": 30,
                                 "max_concurrency": 16},
                          # one variant besides fp32: on the tiny model ONNX Runtime is many
                          # times faster than torch at equal accuracy, so the gate picks it
                          compression={"enabled": True, "variants": ["onnx"]})
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(pipe)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "registered        tiny-sentiment version 1" in out
    assert "promoted          yes" in out
    assert "variant           onnx" in out

    mlflow.set_tracking_uri(tracking)
    client = MlflowClient()
    mv = client.get_model_version_by_alias("tiny-sentiment", "champion")
    assert str(mv.version) == "1"
    bento_tag = re.search(r"bento\s+(\S+:\S+)", out).group(1)
    serve_line = next(line for line in out.splitlines() if "bentoml serve" in line)
    assert bento_tag in serve_line and "--host 127.0.0.1" in serve_line
    # the summary's command names the bento; run it as printed (with a free port)
    from bentos.server import free_port, serve_bento

    args = shlex.split(serve_line.split("serve with", 1)[-1].strip())
    assert args[args.index("serve") + 1] == bento_tag
    port = free_port()
    with serve_bento(bento_tag, port=port, bentoml_home=home) as server:
        r = httpx.post(server.url + "/classify", json={"texts": ["a gorgeous, witty film",
                                                                 "a dull mess"]}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body) == 2
        for item in body:
            assert set(item["probabilities"]) == {"negative", "positive"}
            assert sum(item["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        meta = httpx.get(server.url + "/metadata", timeout=10).json()
        assert meta["model_name"] == "tiny-sentiment" and str(meta["model_version"]) == "1"
        assert meta["alias"] == "champion"
        assert (meta["variant"], meta["runtime"]) == ("onnx", "onnxruntime")
        # the ONNX variant served over HTTP gives fp32's probabilities (within 1e-3)
        from pipelines.families.text_classifier import load_logged, predict_proba

        texts = ["a gorgeous, witty film", "a dull mess", "it is what it is", "fine."]
        served = httpx.post(server.url + "/classify", json={"texts": texts}, timeout=60).json()
        model, tok = load_logged("models:/tiny-sentiment/1")
        ref = predict_proba(model, tok, texts, max_length=128, batch_size=4)
        labels = list(served[0]["probabilities"])
        for row, item in zip(ref, served, strict=True):
            for j, name in enumerate(model.config.id2label.values()):
                assert item["probabilities"][name] == pytest.approx(float(row[j]), abs=1e-3)
        assert labels == ["negative", "positive"]
        bad = httpx.post(server.url + "/classify", json={"texts": ["x" * 101]}, timeout=10)
        assert bad.status_code == 400 and "max_chars=100" in bad.text
        too_many = httpx.post(server.url + "/classify", json={"texts": ["a"] * 5}, timeout=10)
        assert too_many.status_code == 400 and "max_texts=4" in too_many.text
