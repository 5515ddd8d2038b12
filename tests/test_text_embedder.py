"""The text embedder family: retrieval scores and the variant gate (pure), equality with
sentence-transformers' ``encode``, one fine-tuned model per test run through the pyfunc registry
round trip (fresh process) and the ONNX variants (cosine with fp32; lean ONNX runtime), and
scored pairs (read, InfoNCE epoch, Spearman)."""

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


def test_fine_tune_scores_and_fresh_process_pyfunc(tuned, tmp_path, mlflow_store):
    import mlflow

    family, data, model = tuned
    emb = family.predict_proba(model, family.inputs(data.test))
    assert emb.dtype == np.float32 and emb.shape == (len(data.test), 384)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    ev = family.metrics(data.names(data.test), emb, model, list(data.id2label.values()),
                        data=data)
    assert ev.metrics["accuracy"] == ev.metrics["knn_accuracy"] > 0.5
    assert set(ev.predictions) <= {"negative", "positive"}
    texts = data.test.text.tolist()[:8]  # mlflow_store: a fresh store, its own experiment
    with mlflow.start_run():
        info = family.log_model(model, "model", texts[:2])
    mv = mlflow.register_model(info.model_uri, "embed-pyfunc")
    uri = f"models:/embed-pyfunc/{mv.version}"
    assert not list((tmp_path).rglob("*.pkl")) and not list(tmp_path.rglob("*.pickle"))
    code = ("import json, sys, mlflow; mlflow.set_tracking_uri(sys.argv[1]); "
            "m = mlflow.pyfunc.load_model(sys.argv[2]); "
            "print(json.dumps(m.predict(json.loads(sys.argv[3])).tolist()))")
    out = subprocess.run([sys.executable, "-c", code, mlflow_store, uri, json.dumps(texts)],
                         capture_output=True, text=True, timeout=120, check=True)
    fresh = np.array(json.loads(out.stdout.strip().splitlines()[-1]), dtype=np.float32)
    assert np.abs(fresh - emb[:8]).max() < 1e-5
    sig = mlflow.models.get_model_info(uri).signature
    assert sig.inputs.to_dict()[0]["type"] == "string"
    assert tuple(sig.outputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 384)


@pytest.mark.slow  # ONNX export + fusion + int8 (8-13 s on 2 busy cores)
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


def _pair_file(path, n: int = 48, bad_row: int | None = None):
    """Scored pairs from SST-2 sentences: a sentence with its first k of n words (score k/n) or
    with another sentence (score 0)."""
    import pandas as pd
    from embed_support import SST2

    sents = [s for s in pd.read_csv(SST2 / "test.tsv", sep="\t").sentence if len(s.split()) > 6]
    rows = []
    for i in range(n):
        words = sents[i].split()
        if i % 3 == 2:
            rows.append((sents[i], sents[i + n], 0.0))
        else:
            k = max(1, len(words) * (1 + i % 3) // 3)
            rows.append((sents[i], " ".join(words[:k]), k / len(words)))
    df = pd.DataFrame(rows, columns=["a", "b", "score"])
    if bad_row is not None:
        df["score"] = df["score"].astype(object)
        df.loc[bad_row, "score"] = "high"
    df.to_csv(path, sep="\t", index=False)
    return path


@pytest.mark.slow  # a second encoder load + an epoch (9-15 s on 2 busy cores)
def test_scored_pairs_read_train_and_score_spearman(tmp_path):
    from embed_support import pipeline_dict

    from pipelines.config import PipelineConfig
    from pipelines.data import DataError, load_data, split_data
    from pipelines.families import load_family

    raw = pipeline_dict()
    raw["data"].update(path=str(_pair_file(tmp_path / "pairs.tsv")), text_column="a",
                       label_column="score", options={"pair_column": "b", "positive_score": 0.5})
    raw["data"].pop("label_names")
    raw.update(metric="spearman", promotion={"metric": "spearman"})
    cfg = PipelineConfig.from_dict(raw)
    family = load_family(cfg)
    data = split_data(load_data(cfg.data, family), cfg.data)
    assert list(family.profile(data.train).columns) == ["text", "text_b", "label"]
    model = family.base_model()
    out = family.predict_proba(model, family.inputs(data.test))
    assert out.shape == (len(data.test), 768)
    ev = family.metrics(data.names(data.test), out, model, list(data.id2label.values()),
                        data=data)
    assert ev.metrics["spearman"] > 0.5 and 0 <= ev.metrics["accuracy"] <= 1
    trainer = family.trainer(data, {"batch_size": 8, "epochs": 1}, seed=1)
    assert trainer.pairs and len(trainer.texts) == int((data.train.label >= 0.5).sum())
    assert np.isfinite(trainer.train_epoch())
    raw["data"]["path"] = str(_pair_file(tmp_path / "bad.tsv", bad_row=4))
    bad = PipelineConfig.from_dict(raw)
    with pytest.raises(DataError, match="row 5: the pair score 'high' is not a number"):
        load_data(bad.data, load_family(bad))


def test_bad_pooling_fails_before_any_work():
    from embed_support import pipeline_dict

    from pipelines.config import PipelineConfig
    from pipelines.families import load_family
    from pipelines.families.base import FamilyError

    raw = pipeline_dict()
    raw["tuning"]["search_space"]["pooling"] = {"type": "categorical",
                                                "choices": ["mean", "sum"]}
    with pytest.raises(FamilyError, match="'sum': one of"):
        load_family(PipelineConfig.from_dict(raw)).check()
