"""Compression variants in the bento, for real: a tiny BERT (classifier head sharpened so that its
probabilities spread over [0, 1]) registered in a fresh SQLite registry, with ``onnx``,
``onnx-int8``, ``pruned`` and ``pruned+onnx-int8`` variants logged in their own runs and recorded
in the version's ``maas.variants``/``maas.variant`` tags (the pipeline's layout, made by
``bentos.testing``). The chosen ONNX variant is served by ``bentoml serve`` on 127.0.0.1 and
compared with the fp32 PyTorch model; over-budget and unknown variants are refused by
``build_bento``, ``maas build --variant`` and ``mlflow deployments create -C variant=...``."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from helpers import tiny_registry

from bentos import BentoSettings, build_bento
from bentos.build import LABEL_VARIANT, bentoml_store_scope
from bentos.variants import VariantOutOfBudget, choose_variant, read_onnx_variant

pytestmark = pytest.mark.slow  # bentos built and served / full pipeline runs

MODEL_NAME = "tiny-variants"
URI = f"models:/{MODEL_NAME}@champion"
TEXTS = ["a gorgeous, witty film", "a dull mess", "fine.", ("the plot is thin but the cast is "
         "wonderful and the ending works"), "I walked out after twenty minutes"]


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharp_checkpoint(tmp_path_factory, tiny_checkpoint) -> Path:
    """The tiny checkpoint with its classifier head pointed along the direction in which the
    test texts' pooled outputs differ most, so that its probabilities differ from text to text
    (the random head gives ~0.5 for everything, which would hide a mix-up of labels/inputs)."""
    import torch

    from bentos.testing import load_classifier

    model, tok = load_classifier(tiny_checkpoint)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        pooled = model.bert(**enc).pooler_output
        centred = pooled - pooled.mean(0)
        direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        spread = (centred @ direction).abs().max()
        weight = torch.stack([-direction, direction]) * 1.5 / spread
        model.classifier.weight.copy_(weight)
        model.classifier.bias.copy_(-weight @ pooled.mean(0))
    out = tmp_path_factory.mktemp("sharp-bert")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def _pruned(model):
    """A smaller dense copy: the first encoder layer only."""
    import copy

    small = copy.deepcopy(model)
    small.bert.encoder.layer = small.bert.encoder.layer[:1]
    small.config.num_hidden_layers = 1
    return small.eval()


def _log_torch_variant(model, tok, variant: str) -> tuple[str, str]:
    import mlflow

    with mlflow.start_run(run_name=f"variant-{variant}") as run:
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tok}, name="model",
            task="text-classification", pip_requirements=["torch", "transformers"])
    return info.model_uri, run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory, sharp_checkpoint, mlflow_db_template):
    """Registry with the version's variants: onnx (chosen), onnx-int8 and pruned within budget,
    pruned+onnx-int8 outside it."""
    from bentos import testing as t

    with tiny_registry(tmp_path_factory, sharp_checkpoint, MODEL_NAME, "variants-store",
                       template=mlflow_db_template) as s:
        model, tok = t.load_classifier(sharp_checkpoint)
        table = t.add_onnx_variants(MODEL_NAME, s["version"], model, tok, s["root"] / "onnx",
                                    chosen="onnx", int8_drop=0.004, max_accuracy_drop=0.01)
        small = _pruned(model)
        uri, run_id = _log_torch_variant(small, tok, "pruned")
        table["pruned"] = t.variant_entry("torch", uri, run_id, accuracy=0.795,
                                          accuracy_drop=0.005, max_accuracy_drop=0.01)
        onnx_path = t.quantize_int8(t.export_onnx(small, tok, s["root"] / "pruned.onnx"),
                                    s["root"] / "pruned-int8.onnx")
        uri, run_id = t.log_onnx_variant(onnx_path, tok, "pruned+onnx-int8")
        table["pruned+onnx-int8"] = t.variant_entry("onnxruntime", uri, run_id, accuracy=0.75,
                                                    accuracy_drop=0.05, max_accuracy_drop=0.01)
        table["onnx"]["forward_batch_size"] = 8  # the pass size the pipeline measured best
        t.set_variants(MODEL_NAME, s["version"], table, chosen="onnx")
        yield {**s, "table": table, "model": model, "tok": tok}


@pytest.fixture(autouse=True)
def _use_store(use_module_store):
    """Point each test at the module's store (other modules' fixtures move the globals)."""


@pytest.fixture(scope="module")
def chosen(store):
    """The bento of the version's chosen variant (no override)."""
    return build_bento(URI, BentoSettings(max_batch_size=16, max_texts=8, max_chars=300))


def _fp32_probabilities(store, texts: list[str]) -> list[float]:
    import torch

    enc = store["tok"](texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return torch.softmax(store["model"].eval()(**enc).logits, -1)[:, 1].tolist()


# -- the variant choice (pure) -----------------------------------------------------------------
def test_choose_variant_rules():
    pinned = "models:/m/3"
    assert choose_variant({}, pinned, None).name == "fp32"  # versions from before variants
    entry = {"runtime": "onnxruntime", "model_uri": "models:/m-1", "within_budget": True,
             "accuracy_drop": 0.002, "max_accuracy_drop": 0.01, "forward_batch_size": 16}
    over = {**entry, "within_budget": False, "accuracy_drop": 0.031}
    tags = {"maas.variant": "onnx", "maas.variants": json.dumps({"onnx": entry,
                                                                 "onnx-int8": over})}
    v = choose_variant(tags, pinned, None)
    assert (v.name, v.runtime, v.model_uri, v.chosen) == ("onnx", "onnxruntime", "models:/m-1",
                                                          True)
    assert v.forward_batch_size == 16
    for bad in (True, 0, -4, "8", 2.5):
        odd = json.dumps({"onnx": {**entry, "forward_batch_size": bad}})
        assert choose_variant({"maas.variants": odd, "maas.variant": "onnx"}, pinned,
                              None).forward_batch_size is None
    fp32 = choose_variant(tags, pinned, "fp32")
    assert (fp32.runtime, fp32.model_uri, fp32.chosen) == ("torch", pinned, False)
    with pytest.raises(VariantOutOfBudget, match=r"'onnx-int8'.*0\.0310 > max_accuracy_drop "
                                                 r"0\.0100"):
        choose_variant(tags, pinned, "onnx-int8")
    with pytest.raises(ValueError, match="unknown variant 'int4'.*fp32, onnx, onnx-int8"):
        choose_variant(tags, pinned, "int4")
    with pytest.raises(ValueError, match="not valid JSON"):
        choose_variant({"maas.variants": "{oops"}, pinned, None)
    with pytest.raises(ValueError, match="runtime"):
        choose_variant({"maas.variants": json.dumps({"x": {"runtime": "tvm", "model_uri": "u",
                                                           "within_budget": True}})}, pinned, "x")
    assert BentoSettings.from_mapping({"variant": "onnx-int8"}).variant == "onnx-int8"
    with pytest.raises(ValueError, match="variant"):
        BentoSettings(variant="no such/variant")


def test_onnx_with_external_data_is_refused(tmp_path, tiny_checkpoint):
    import onnx

    from bentos import testing as t
    from bentos.variants import Variant

    model, tok = t.load_classifier(tiny_checkpoint)
    path = t.export_onnx(model, tok, tmp_path / "single.onnx")
    folder = tmp_path / "logged"
    (folder / "extra_files").mkdir(parents=True)
    (folder / "extra_files" / "maas_variant.json").write_text(json.dumps(
        {"labels": ["negative", "positive"], "output_name": "logits"}))
    onnx.save(onnx.load(str(path)), str(folder / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights.data", size_threshold=0)
    variant = Variant(name="onnx", runtime="onnxruntime", model_uri="models:/m-x")
    with pytest.raises(ValueError, match="external data"):
        read_onnx_variant(folder, variant)
    onnx.save(onnx.load(str(path)), str(folder / "model.onnx"))
    meta = read_onnx_variant(folder, variant)
    assert meta["max_positions"] == 128 and meta["dtype"] == "float32"


# -- build -------------------------------------------------------------------------------------
def test_build_serves_the_chosen_variant(store, chosen):
    import bentoml

    assert (chosen.variant, chosen.runtime) == ("onnx", "onnxruntime")
    with bentoml_store_scope():
        bento = bentoml.bentos.get(chosen.bento_tag)
        model = bentoml.models.get(chosen.model_tag)
        files = {p.name for p in Path(model.path).iterdir()}
        config = json.loads((Path(bento.path) / "src" / "bento_config.json").read_text())
        src = {p.name for p in (Path(bento.path) / "src").iterdir()}
    assert bento.info.labels[LABEL_VARIANT] == "onnx"
    assert {"model.onnx", "tokenizer.json", "maas_variant.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".safetensors")) for f in files)
    assert {"service.py", "maas_runtime.py", "bento_config.json"} <= src
    assert config["variant"]["name"] == "onnx" and config["variant"]["runtime"] == "onnxruntime"
    assert config["variant"]["model_uri"] == store["table"]["onnx"]["model_uri"]
    assert config["variant"]["onnx"]["max_positions"] == 128
    assert config["labels"] == ["negative", "positive"]
    # no forward_batch_size in the settings: the variant's measured best pass size is baked in
    assert config["settings"]["forward_batch_size"] == 8


def test_build_refuses_variant_outside_budget(store):
    import bentoml

    with bentoml_store_scope():
        before = len(bentoml.models.list())
    with pytest.raises(VariantOutOfBudget) as info:
        build_bento(URI, BentoSettings(variant="pruned+onnx-int8"))
    msg = str(info.value)
    assert "'pruned+onnx-int8'" in msg and "0.0500" in msg and "0.0100" in msg
    with pytest.raises(ValueError, match="unknown variant 'int4'.*onnx-int8, pruned"):
        build_bento(URI, BentoSettings(variant="int4"))
    with bentoml_store_scope():
        assert len(bentoml.models.list()) == before  # nothing imported for a refused build


def test_torch_and_int8_variants_in_process(store, _restore_torch_threads):
    from bentos.testing import load_service

    fp32 = _fp32_probabilities(store, TEXTS)
    pruned = build_bento(URI, BentoSettings(variant="pruned"))
    assert (pruned.variant, pruned.runtime) == ("pruned", "torch")
    _, svc = load_service(pruned.bento_tag)
    assert svc.info["variant"] == "pruned" and svc.classifier.config.num_hidden_layers == 1
    int8 = build_bento(URI, BentoSettings(variant="onnx-int8"))
    _, qsvc = load_service(int8.bento_tag)
    assert qsvc.info["runtime"] == "onnxruntime" and qsvc.info["dtype"] == "int8"
    out = qsvc.predict_texts(TEXTS)
    # the sharpened head amplifies int8 rounding on this tiny model: check well-formed answers
    # (the int8 graph really runs; closeness to fp32 is what the pipeline's budget measures)
    assert len(out) == len(TEXTS) and {p["label"] for p in out} <= {"negative", "positive"}
    assert all(sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-6) for p in out)
    pruned_out = svc.predict_texts(TEXTS)
    assert [p["probabilities"]["positive"] for p in pruned_out] != pytest.approx(fp32, abs=1e-6)


@pytest.fixture
def _restore_torch_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# -- serving over HTTP -------------------------------------------------------------------------
def test_onnx_variant_served_over_http_matches_fp32(store, chosen):
    from bentos.server import serve_bento

    fp32 = _fp32_probabilities(store, TEXTS)
    assert max(fp32) - min(fp32) > 0.2  # the test texts really get different answers
    with serve_bento(chosen.bento_tag, bentoml_home=store["home"],
                     log_path=store["root"] / "server-onnx.log") as srv:
        meta = httpx.get(srv.url + "/metadata", timeout=10).json()
        assert meta["variant"] == "onnx" and meta["runtime"] == "onnxruntime"
        assert meta["providers"] == ["CPUExecutionProvider"] and meta["device"] == "cpu"
        assert meta["dtype"] == "float32" and meta["model_version"] == store["version"]
        assert meta["variant_model_uri"] == store["table"]["onnx"]["model_uri"]
        r = httpx.post(srv.url + "/classify", json={"texts": TEXTS}, timeout=30)
        assert r.status_code == 200, r.text
        got = [p["probabilities"]["positive"] for p in r.json()]
        assert [p["label"] for p in r.json()] == [
            "positive" if g > 0.5 else "negative" for g in got]
        for a, b in zip(got, fp32, strict=True):
            assert a == pytest.approx(b, abs=1e-3)
        # one text per request, concurrently: the batcher merges them, the answers stay right
        from bentos.loadgen import load

        result = load(srv.url + "/classify", [[t] for t in TEXTS], requests=60, concurrency=8,
                      time_budget_s=60)
        assert result.ok == 60 and result.malformed == 0, result.summary()
        r = httpx.post(srv.url + "/classify", json={"texts": ["x" * 301]}, timeout=30)
        assert r.status_code == 400 and "max_chars=300" in r.text


# -- the command line and the MLflow deployments target ----------------------------------------
def test_maas_build_variant_option(store):
    from click.testing import CliRunner

    from pipelines.cli import main

    runner = CliRunner()
    out = runner.invoke(main, ["build", f"{MODEL_NAME}@champion", "--variant",
                               "pruned+onnx-int8"])
    assert out.exit_code == 4, out.output
    assert "pruned+onnx-int8" in out.output and "accuracy budget" in out.output
    out = runner.invoke(main, ["build", f"{MODEL_NAME}@champion", "--variant", "int4"])
    assert out.exit_code == 2 and "known variants are fp32, onnx, onnx-int8" in out.output
    out = runner.invoke(main, ["build", f"{MODEL_NAME}@champion", "--variant", "onnx-int8"])
    assert out.exit_code == 0, out.output
    assert "variant onnx-int8 on onnxruntime" in out.output


def test_mlflow_deployments_variant_config(store):
    from mlflow.deployments import get_deploy_client
    from mlflow.exceptions import MlflowException

    client = get_deploy_client("bentoml")
    d = client.create_deployment("variants-int8", URI, config={"variant": "onnx-int8"})
    assert (d["variant"], d["runtime"]) == ("onnx-int8", "onnxruntime")
    assert d["settings"]["variant"] == "onnx-int8"
    with pytest.raises(MlflowException, match="accuracy budget"):
        client.create_deployment("variants-bad", URI, config={"variant": "pruned+onnx-int8"})
    client.delete_deployment("variants-int8")
    # MLflow's own command line (in process: its option parsing and the plugin lookup are the
    # point, not a process boundary)
    from click.testing import CliRunner
    from mlflow.deployments.cli import commands

    res = CliRunner().invoke(commands, ["create", "-t", "bentoml", "--name", "variants-cli",
                                        "-m", URI, "-C", "variant=pruned"],
                             env={"MLFLOW_TRACKING_URI": store["uri"],
                                  "BENTOML_HOME": str(store["home"])})
    assert res.exit_code == 0, (res.output[-3000:], res.exception)
    assert client.get_deployment("variants-cli")["variant"] == "pruned"


@pytest.mark.gpu
def test_onnx_variant_uses_gpu_providers_when_listed(store, chosen):
    import onnxruntime as ort

    from bentos.testing import load_service

    if not {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(
            ort.get_available_providers()):
        pytest.skip("needs onnxruntime with the CUDA or TensorRT execution provider")
    module, svc = load_service(chosen.bento_tag)
    assert module.HAS_GPU and svc.info["device"] == "cuda"
    assert svc.info["providers"][0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    fp32 = _fp32_probabilities(store, TEXTS)
    got = [p["probabilities"]["positive"] for p in svc.predict_texts(TEXTS)]
    assert max(abs(a - b) for a, b in zip(got, fp32, strict=True)) < 1e-2
