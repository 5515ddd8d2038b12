"""The text embedder family: retrieval scores and the variant gate (pure), equality with
sentence-transformers' ``encode``, one fine-tuned model per test run through the pyfunc registry
round trip (fresh process) and the ONNX variants (cosine with fp32; lean ONNX runtime)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from embed_support import REPO, setup, trained_embedder


def test_knn_scores_on_known_vectors():
    from pipelines.families.text_embedder.retrieval import knn

    index = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    labels = ["a", "a", "b", "b"]
    queries = np.array([[1, 0.05], [0.05, 1], [0.95, 0.0]], dtype=np.float32)
    r = knn(queries, ["a", "b", "b"], index, labels, k=2)
    assert r.predicted == ["a", "b", "a"]
    assert r.metrics["knn_accuracy"] == pytest.approx(2 / 3)
    assert r.metrics["recall_at_k"] == pytest.approx(2 / 3)
    assert r.metrics["precision_at_k"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="one label per query"):
        knn(queries, ["a"], index, labels, k=2)


def test_variant_gate_needs_the_cosine_floor():
    from registry import choose_variant

    rows = {"fp32": {"knn_accuracy": 0.80, "texts_per_s": 10, "mean_cosine_vs_fp32": 1.0},
            "onnx": {"knn_accuracy": 0.80, "texts_per_s": 20, "mean_cosine_vs_fp32": 0.9999},
            "onnx-int8": {"knn_accuracy": 0.81, "texts_per_s": 40, "mean_cosine_vs_fp32": 0.97}}
    c = choose_variant(rows, "knn_accuracy", 0.01, floors={"mean_cosine_vs_fp32": 0.99})
    assert c.chosen == "onnx" and not c.within_budget["onnx-int8"]
    assert "mean_cosine_vs_fp32 0.9700 < 0.99" in c.reason
    assert choose_variant(rows, "knn_accuracy", 0.01).chosen == "onnx-int8"  # no floor


def test_metric_names_come_from_the_family():
    from embed_support import pipeline_dict

    from pipelines.config import ConfigError, PipelineConfig

    assert PipelineConfig.from_dict(pipeline_dict()).metric == "knn_accuracy"
    bad = pipeline_dict()
    bad["model"]["family"] = "text_classifier"
    bad["model"].pop("options")
    with pytest.raises(ConfigError, match="unknown metric 'knn_accuracy'"):
        PipelineConfig.from_dict(bad)


def test_mean_pooling_equals_sentence_transformers():
    st = pytest.importorskip("sentence_transformers",
                             reason="sentence-transformers (the test extra) is not installed")
    family, data = setup()
    reference = st.SentenceTransformer(str(family.checkpoint), device="cpu")
    # the same token limit as sentence-transformers' (256 for this checkpoint)
    model = replace(family.base_model(), max_length=reference.max_seq_length)
    texts = data.test.text.tolist()[:40] + ["ok", "a " * 300]
    ours = family.predict_proba(model, texts)
    ref = reference.encode(texts)
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.9999, cos.min()


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    family, data = setup()
    return family, data, family.load(trained_embedder(tmp_path_factory))


def test_fine_tune_scores_and_fresh_process_pyfunc(tuned, tmp_path):
    import mlflow

    family, data, model = tuned
    emb = family.predict_proba(model, family.inputs(data.test))
    assert emb.dtype == np.float32 and emb.shape == (len(data.test), 384)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    ev = family.metrics(data.names(data.test), emb, model, list(data.id2label.values()))
    assert ev.metrics["accuracy"] == ev.metrics["knn_accuracy"] > 0.5
    assert set(ev.predictions) <= {"negative", "positive"}
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    texts = data.test.text.tolist()[:8]
    with mlflow.start_run():
        info = family.log_model(model, "model", texts[:2])
    mv = mlflow.register_model(info.model_uri, "embed-pyfunc")
    uri = f"models:/embed-pyfunc/{mv.version}"
    assert not list((tmp_path).rglob("*.pkl")) and not list(tmp_path.rglob("*.pickle"))
    code = ("import json, sys, mlflow; mlflow.set_tracking_uri(sys.argv[1]); "
            "m = mlflow.pyfunc.load_model(sys.argv[2]); "
            "print(json.dumps(m.predict(json.loads(sys.argv[3])).tolist()))")
    out = subprocess.run([sys.executable, "-c", code, f"sqlite:///{tmp_path / 'mlflow.db'}",
                          uri, json.dumps(texts)], capture_output=True, text=True, timeout=120,
                         check=True)
    fresh = np.array(json.loads(out.stdout.strip().splitlines()[-1]), dtype=np.float32)
    assert np.abs(fresh - emb[:8]).max() < 1e-5
    sig = mlflow.models.get_model_info(uri).signature
    assert sig.inputs.to_dict()[0]["type"] == "string"
    assert tuple(sig.outputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 384)


def test_onnx_variants_agree_with_fp32_and_run_lean(tuned, tmp_path):
    family, data, model = tuned
    comp = family.compressor(model, data, tmp_path / "variants")
    texts = data.test.text.tolist()
    ref = comp.build("fp32").clf.predict_proba(texts)
    for name, floor in (("onnx", 0.9999), ("onnx-int8", 0.99)):
        v = comp.build(name)
        agree = family.agreement(v.clf.predict_proba(texts), ref)
        assert agree["mean_cosine_vs_fp32"] >= floor, (name, agree)
    folder = comp.graph("onnx-int8")
    code = ("import importlib.util, json, sys; "
            "s = importlib.util.spec_from_file_location('rt', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "r = m.OrtEmbedRuntime(sys.argv[2], threads=1); v = r.embed(['a fine film']); "
            "print(json.dumps([v.shape[1], 'torch' in sys.modules, "
            "'transformers' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code,
                          str(REPO / "bentos" / "text_embedder" / "maas_runtime.py"),
                          str(folder)], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [384, False, False]
