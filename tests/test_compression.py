"""Compression variants inside the real pipeline (tiny BERT, SQLite MLflow store, real ONNX export
and ONNX Runtime): one child run per variant with its figures and model, the gate's choice and the
variant table on the registered version, a failing variant skipped with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from helpers import SST2, module_store, write_pipeline
from mlflow import MlflowClient

from pipelines.cli import main
from registry import choose_variant

pytestmark = pytest.mark.slow  # bentos built and served / full pipeline runs

VARIANTS = ["onnx", "onnx-int8", "pruned", "pruned+onnx-int8"]
FIGURES = {"size_mb", "params", "texts_per_s", "p50_ms_b1", "accuracy", "f1_macro",
           "agreement_with_fp32"}


def run_pipeline(tmp_path, checkpoint, **compression):
    pipe = write_pipeline(tmp_path, checkpoint,
                          compression={"enabled": True, "variants": VARIANTS, **compression})
    res = CliRunner().invoke(main, ["run", str(pipe), "--no-build"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_checkpoint, mlflow_db_template):
    """One run with every variant, in a store of its own, shared by the tests that only read
    it (tests/conftest.py's ``use_module_store`` points each of them at it)."""
    with module_store(tmp_path_factory, "compression", mlflow_db_template) as store:
        res = run_pipeline(store["root"], tiny_checkpoint)
    return {**store, "output": res.output}


@pytest.fixture(autouse=True)
def _use_store(use_module_store):
    """Point each test that asks for ``store`` at it (other modules' fixtures move the
    globals)."""


def variant_runs(client) -> dict:
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], "tags.`maas.role` = 'variant'")
    return {r.data.tags["maas.variant"]: r for r in runs}


def test_variants_are_child_runs_and_the_version_carries_the_choice(store):
    client = MlflowClient()
    runs = variant_runs(client)
    assert set(runs) == {"fp32", *VARIANTS}
    mv = client.get_model_version("tiny-sentiment", "1")
    for name, r in runs.items():
        assert r.info.status == "FINISHED", (name, r.data.tags.get("maas.variant_error"))
        assert r.data.tags["mlflow.parentRunId"] == mv.run_id
        assert FIGURES <= set(r.data.metrics), name
        assert r.data.metrics["texts_per_s"] > 0 and r.data.metrics["p50_ms_b1"] > 0

    table = json.loads(mv.tags["maas.variants"])
    assert set(table) == {"fp32", *VARIANTS}
    expected = choose_variant(table, "accuracy", 0.01)
    assert mv.tags["maas.variant"] == expected.chosen
    assert f"variant           {expected.chosen}" in store["output"]
    assert table["fp32"]["model_uri"] == mv.tags["maas.model_uri"]
    onnx = table["onnx"]
    assert onnx["metric"] == "accuracy" and onnx["metric_value"] == onnx["accuracy"]
    assert table["onnx"]["runtime"] == table["onnx-int8"]["runtime"] == "onnxruntime"
    assert table["pruned"]["runtime"] == "torch"
    # int8 weights are about 4x smaller; the pruned model really has fewer parameters
    assert table["onnx-int8"]["size_mb"] < 0.6 * table["onnx"]["size_mb"]
    assert table["pruned"]["params"] < table["fp32"]["params"]
    assert table["pruned+onnx-int8"]["params"] == table["pruned"]["params"]

    from registry import describe

    assert describe("tiny-sentiment")[0]["variant"] == expected.chosen
    models = CliRunner().invoke(main, ["models", "tiny-sentiment"], catch_exceptions=False)
    assert "variant" in models.output.splitlines()[0] and expected.chosen in models.output

    arts = {a.path for a in client.list_artifacts(mv.run_id, "compression")}
    assert {"compression/variants.json", "compression/variants.md"} <= arts
    doc = mlflow.artifacts.load_dict(f"runs:/{mv.run_id}/compression/variants.json")
    assert doc["chosen"] == expected.chosen
    assert doc["speedup_vs_fp32"] == pytest.approx(expected.speedup, rel=1e-3)  # tag: rounded


def test_onnx_variant_model_matches_fp32(store):
    from pipelines.families.text_classifier import load_logged, predict_proba
    from pipelines.onnx_variants import OrtClassifier

    mv = MlflowClient().get_model_version("tiny-sentiment", "1")
    table = json.loads(mv.tags["maas.variants"])
    texts = pd.read_csv(SST2 / "test.tsv", sep="\t").sentence.tolist()[:64]
    model, tok = load_logged("models:/tiny-sentiment/1")
    ref = predict_proba(model, tok, texts, max_length=32, batch_size=16)
    folder = mlflow.artifacts.download_artifacts(artifact_uri=table["onnx"]["model_uri"])
    meta = json.loads((Path(folder) / "extra_files" / "maas_variant.json").read_text())
    assert meta["variant"] == "onnx" and meta["labels"] == ["negative", "positive"]
    assert mlflow.onnx.load_model(table["onnx"]["model_uri"]).graph.output[0].name == "logits"
    from transformers import AutoTokenizer

    onnx_tok = AutoTokenizer.from_pretrained(f"{folder}/extra_files")
    clf = OrtClassifier(f"{folder}/model.onnx", onnx_tok, meta["max_length"], threads=1)
    got = np.concatenate([clf.predict_proba(texts[i:i + 16]) for i in range(0, 64, 16)])
    assert np.abs(got - ref).max() < 1e-3


def test_a_failing_variant_is_skipped_with_its_reason(mlflow_store, tmp_path, tiny_checkpoint,
                                                      monkeypatch):
    from pipelines import onnx_variants

    def broken(*args, **kwargs):  # fault injection: the int8 step fails as a real one could
        raise RuntimeError("injected quantisation failure")

    monkeypatch.setattr(onnx_variants, "quantize", broken)
    run_pipeline(tmp_path, tiny_checkpoint, variants=["onnx", "onnx-int8"])
    client = MlflowClient()
    runs = variant_runs(client)
    assert runs["onnx-int8"].info.status == "FAILED"
    assert "injected quantisation failure" in runs["onnx-int8"].data.tags["maas.variant_error"]
    assert runs["onnx"].info.status == "FINISHED"
    mv = client.get_model_version("tiny-sentiment", "1")
    table = json.loads(mv.tags["maas.variants"])
    assert table["onnx-int8"]["within_budget"] is False and "injected" in table["onnx-int8"][
        "error"]
    assert mv.tags["maas.variant"] in {"fp32", "onnx"}
