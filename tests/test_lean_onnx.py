"""The lean ONNX bento: an ONNX Runtime variant is served without torch or transformers (the
tokenizer runs from ``tokenizer.json`` with ``tokenizers``), its bento lists only what that
runtime needs, a torch variant still gets torch, and the answers are the same as with the
transformers tokenizer (identical token ids, probabilities within 1e-5) on real SST-2 texts.

A tiny BERT with the real MiniLM tokenizer is registered in a fresh SQLite registry with ONNX
variants (``bentos.testing``), built into bentos and served by ``bentoml serve`` on 127.0.0.1."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
from helpers import SST2, tiny_registry

from bentos import BentoSettings, build_bento
from bentos.build import bentoml_store_scope

MODEL_NAME = "tiny-lean"
URI = f"models:/{MODEL_NAME}@champion"
#: texts that stress a tokenizer: accents, CJK, emoji, ligatures, control whitespace, special
#: token spellings, and one far over the length limit (truncation)
ODD_TEXTS = ["Café naïve résumé — ÀÉÎÕÜ", "日本語のテキスト and 中文", "great 😀👍🏽 film",
             "ﬁne ﬂow", "  tabs\tand\nnew lines  ", "[CLS] [SEP] [PAD] [MASK] [UNK]",
             "word " * 900]


def _runtime_module():
    spec = importlib.util.spec_from_file_location(
        "lean_test_maas_runtime",
        Path(__file__).resolve().parents[1] / "bentos/text_classifier/maas_runtime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sst2_texts(n: int) -> list[str]:
    with (SST2 / "test.tsv").open(encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [r[0] for r in rows[:n]]


@pytest.fixture(scope="module")
def sharp_checkpoint(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny checkpoint with its head pointed along the direction in which SST-2 texts'
    pooled outputs differ most (the random head gives ~0.5 for every text, which would hide a
    mix-up of token ids)."""
    import torch

    from bentos.testing import load_classifier

    model, tok = load_classifier(tiny_checkpoint)
    enc = tok(_sst2_texts(64), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        pooled = model.bert(**enc).pooler_output
        centred = pooled - pooled.mean(0)
        direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        weight = torch.stack([-direction, direction]) * 2.0 / (centred @ direction).abs().max()
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(-weight @ pooled.mean(0))
    out = tmp_path_factory.mktemp("lean-sharp-bert")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory, sharp_checkpoint):
    """The sharpened tiny classifier with onnx and onnx-int8 variants; onnx-int8 chosen."""
    from bentos import testing as t

    with tiny_registry(tmp_path_factory, sharp_checkpoint, MODEL_NAME, "lean-store") as s:
        model, tok = t.load_classifier(sharp_checkpoint)
        t.add_onnx_variants(MODEL_NAME, s["version"], model, tok, s["root"] / "onnx",
                            chosen="onnx-int8")
        yield s


@pytest.fixture(autouse=True)
def _use_store(use_module_store):
    """Point each test at the module's store."""


@pytest.fixture(scope="module")
def onnx_bento(store):
    return build_bento(URI, BentoSettings(max_batch_size=16, max_texts=64, workers=2))


def _bento_src(tag: str) -> Path:
    import bentoml

    with bentoml_store_scope():
        return Path(bentoml.bentos.get(tag).path)


def _requirements(tag: str) -> list[str]:
    text = (_bento_src(tag) / "env" / "python" / "requirements.txt").read_text("utf-8")
    return [line.split("==")[0].strip().lower() for line in text.splitlines() if line.strip()]


def _model_dir(model_tag: str) -> Path:
    import bentoml

    with bentoml_store_scope():
        return Path(bentoml.models.get(model_tag).path)


def test_lean_tokenizer_gives_the_transformers_token_ids(tiny_checkpoint):
    """Same ids, attention masks and token type ids as transformers' tokenizer, at three
    length limits, on 872 real SST-2 sentences plus odd texts."""
    from transformers import AutoTokenizer

    rt = _runtime_module()
    texts = _sst2_texts(872) + ODD_TEXTS
    hf, lean = AutoTokenizer.from_pretrained(tiny_checkpoint), rt.LeanTokenizer(tiny_checkpoint)
    assert (lean.pad_token_id, lean.model_max_length) == (hf.pad_token_id, hf.model_max_length)
    for limit in (16, 128, 512):
        a = hf(texts, truncation=True, max_length=limit)
        b = lean(texts, truncation=True, max_length=limit)
        for name in ("input_ids", "attention_mask", "token_type_ids"):
            diff = [i for i, (x, y) in enumerate(zip(a[name], b[name], strict=True)) if x != y]
            assert not diff, (name, limit, [texts[i][:60] for i in diff[:3]])
    assert max(len(ids) for ids in b["input_ids"]) == 512  # the long text was truncated


def test_lean_and_transformers_paths_answer_the_same(onnx_bento):
    """The served variant's folder run by OrtRuntime with each tokenizer: probabilities within
    1e-5 on real texts (in passes of 4, padded per pass, as served)."""
    rt = _runtime_module()
    folder = _model_dir(onnx_bento.model_tag)
    config = json.loads((_bento_src(onnx_bento.bento_tag) / "src" / "bento_config.json")
                        .read_text("utf-8"))
    onnx, labels = config["variant"]["onnx"], config["labels"]
    lean = rt.OrtRuntime(folder, threads=1, onnx=onnx, labels=labels)
    full = rt.OrtRuntime(folder, threads=1, onnx=onnx, labels=labels, lean=False)
    assert lean.info["tokenizer"] == "tokenizers" and full.info["tokenizer"] == "transformers"
    assert lean.max_tokens == full.max_tokens
    texts = _sst2_texts(300) + ODD_TEXTS
    a, b = lean.probabilities(texts), full.probabilities(texts)
    worst = max(abs(x - y) for ra, rb in zip(a, b, strict=True)
                for x, y in zip(ra, rb, strict=True))
    assert worst <= 1e-5, worst
    assert len({round(r[0], 4) for r in a}) > 10  # the texts give different answers


def test_onnx_bento_requirements_are_lean_and_torch_keeps_torch(store, onnx_bento):
    reqs = _requirements(onnx_bento.bento_tag)
    assert {"onnxruntime", "numpy", "tokenizers", "bentoml"} <= set(reqs), reqs
    assert not {"torch", "transformers", "safetensors"} & set(reqs), reqs
    torch_bento = build_bento(URI, BentoSettings(variant="fp32"))
    reqs = _requirements(torch_bento.bento_tag)
    assert {"torch", "transformers", "tokenizers", "safetensors"} <= set(reqs), reqs


def test_served_onnx_workers_load_neither_torch_nor_transformers(store, onnx_bento, tmp_path):
    """``bentoml serve`` with 2 workers: no libtorch mapped in any process, the tokenizer is
    ``tokenizers``, and the answers equal the transformers-tokenizer path's (one text per
    request: dynamic int8 scales each pass by its own values, padding included, so a text's
    probabilities depend on the pass it shares)."""
    from bentos.server import serve_bento

    rt = _runtime_module()
    texts = _sst2_texts(20)
    with serve_bento(onnx_bento.bento_tag, bentoml_home=store["home"],
                     log_path=tmp_path / "serve.log") as srv:
        got = [httpx.post(f"{srv.url}/classify", json={"texts": [text]}, timeout=60)
               for text in texts]
        assert all(r.status_code == 200 for r in got), got[0].text
        meta = httpx.get(f"{srv.url}/metadata", timeout=30).json()
        procs = [psutil.Process(srv.process.pid),
                 *psutil.Process(srv.process.pid).children(recursive=True)]
        mapped = {m.path for p in procs for m in p.memory_maps()}
    assert len(procs) >= 3  # the server and its two workers
    assert meta["tokenizer"] == "tokenizers" and meta["runtime"] == "onnxruntime"
    assert not [p for p in mapped if "libtorch" in p or "/torch/" in p]
    assert [p for p in mapped if "tokenizers" in p]
    config = json.loads((_bento_src(onnx_bento.bento_tag) / "src" / "bento_config.json")
                        .read_text("utf-8"))
    full = rt.OrtRuntime(_model_dir(onnx_bento.model_tag), threads=1,
                         onnx=config["variant"]["onnx"], labels=config["labels"], lean=False)
    for text, response in zip(texts, got, strict=True):
        [row], [want] = response.json(), full.probabilities([text])
        assert max(abs(row["probabilities"][lab] - p)
                   for lab, p in zip(config["labels"], want, strict=True)) <= 1e-5, text


def test_onnx_service_imports_neither_torch_nor_transformers(store, onnx_bento):
    """The service module and its runtime, loaded in a fresh interpreter: after a prediction,
    neither torch nor transformers is in ``sys.modules``."""
    code = ("import sys\n"
            "from bentos.testing import load_service\n"
            f"module, svc = load_service({onnx_bento.bento_tag!r})\n"
            "svc.predict_texts(['a fine film', 'dull'])\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
