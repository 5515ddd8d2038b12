"""Variants that know their machine: ``bentos.machine`` reads the CPU model, the ISA features that
decide which variant is fastest (AVX2, AVX-512, VNNI, BF16, AMX) and the thread count; the
pipeline's variant table records it, and a bento served on a CPU whose features differ from the
recorded ones times its candidate variants there and serves the fastest.

The re-check is shown for real: a registered version whose chosen variant ``onnx`` is a 4-layer,
128-wide BERT graph recorded as chosen on a simulated AVX-512/VNNI/AMX machine, with a 2-layer,
32-wide ``onnx-int8`` within budget beside it; ``bentoml serve`` on this machine times both and
serves ``onnx-int8``, and ``/metadata`` says so; a build here re-times them itself and packages
``onnx-int8`` as the served variant. With the recorded features equal to this CPU's, nothing is
re-timed and the choice stands."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from helpers import tiny_registry

from bentos import BentoSettings, build_bento, machine
from bentos.build import bentoml_store_scope

MODEL_NAME = "tiny-machine"
URI = f"models:/{MODEL_NAME}@champion"

XEON_SPR = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile \
amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu
"""
EPYC_ROME = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse2 avx avx2 fma\n"
ALDER_LAKE = ("processor\t: 0\nmodel name\t: 12th Gen Intel(R) Core(TM) i7-1260P\n"
              "flags\t\t: avx avx2 avx_vnni\n")
GRAVITON = "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd evtstrm aes sve\n"


@pytest.mark.parametrize(("text", "model", "features"), [
    (XEON_SPR, "Intel(R) Xeon(R) Platinum 8480+", ["avx2", "avx512f", "vnni", "bf16", "amx"]),
    (EPYC_ROME, "AMD EPYC 7B12", ["avx2"]),
    (ALDER_LAKE, "12th Gen Intel(R) Core(TM) i7-1260P", ["avx2", "vnni"]),
    (GRAVITON, "", []),
])
def test_features_from_cpuinfo(text, model, features):
    name, flags = machine.parse_cpuinfo(text)
    assert name == model
    found = machine.features_of(flags)
    assert sorted(found) == sorted(machine.FEATURES)
    assert [k for k, v in found.items() if v] == features


def test_describe_reads_this_machine():
    here = machine.describe()
    flags = machine.parse_cpuinfo(Path("/proc/cpuinfo").read_text())[1]
    assert here["features"] == machine.features_of(flags)
    assert here["cpu_model"] and here["threads"] >= 1
    assert machine.summary(here).startswith(here["cpu_model"])
    json.dumps(here)  # recorded in tags, JSON results and /metadata


def test_differs_names_each_feature_and_ignores_unrecorded():
    xeon = {"features": machine.features_of(machine.parse_cpuinfo(XEON_SPR)[1])}
    epyc = {"features": machine.features_of(machine.parse_cpuinfo(EPYC_ROME)[1])}
    assert machine.differs(xeon, epyc) == ["-avx512f", "-vnni", "-bf16", "-amx"]
    assert machine.differs(epyc, xeon) == ["+avx512f", "+vnni", "+bf16", "+amx"]
    assert machine.differs(epyc, epyc) == []
    assert machine.differs(None, epyc) == [] and machine.differs({"cpu_model": "x"}, epyc) == []


def test_fastest_keeps_the_incumbent_within_the_noise():
    assert machine.fastest({"onnx": 100.0, "onnx-int8": 104.0}, "onnx") == "onnx"
    assert machine.fastest({"onnx": 100.0, "onnx-int8": 130.0}, "onnx") == "onnx-int8"
    assert machine.fastest({"onnx": 100.0, "onnx-int8": 60.0}, "onnx-int8") == "onnx"


def test_variant_table_records_the_machine():
    """The pipeline's per-variant figures (and so the version's ``maas.variants`` table) carry
    the machine they were measured on."""
    import numpy as np

    from pipelines.variant_speed import Measured, figures

    probs = np.array([[0.2, 0.8], [0.9, 0.1]])
    f = figures(Measured(probs=probs, texts_per_s=[10.0, 12.0]), probs, {"accuracy": 1.0})
    assert f["machine"] == machine.describe()


def test_card_states_the_machine_of_the_choice():
    """The card's facts take the chosen variant's recorded machine; the card renders it."""
    from pipelines.card_facts import _machine
    from registry.card import render_card

    epyc = {"cpu_model": "AMD EPYC 7B12", "threads": 2,
            "features": machine.features_of(machine.parse_cpuinfo(EPYC_ROME)[1])}
    tags = {"maas.variant": "onnx-int8",
            "maas.variants": json.dumps({"onnx-int8": {"machine": epyc}, "fp32": {}})}
    facts = _machine(tags)
    assert facts["cpu_model"] == "AMD EPYC 7B12" and facts["measured_for"] == "variant choice"
    md = render_card({"model": {"name": "m", "version": "1"}, "machine": facts})
    for text in ("## Machine", "- CPU: AMD EPYC 7B12; 2 threads", "- ISA features: avx2\n"):
        assert text in md, md
    assert _machine({})["features"] == machine.describe()["features"]


def test_variant_markdown_table_names_the_machine():
    from pipelines.compression import Outcome, Variant, markdown_table
    from registry import choose_variant

    here = machine.describe()
    rows = {n: {"texts_per_s": tps, "forward_batch_size": 4, "p50_ms_b1": 3.0, "accuracy": 0.9,
                "agreement_with_fp32": 1.0, "machine": here}
            for n, tps in (("fp32", 100.0), ("onnx-int8", 250.0))}
    variants = {n: Variant(n, "torch" if n == "fp32" else "onnxruntime", figures=f)
                for n, f in rows.items()}
    outcome = Outcome(variants, choose_variant(rows, "accuracy", 0.01), "accuracy", 0.01)
    assert f"Measured on {machine.summary(here)}." in markdown_table(outcome)
    assert outcome.table()["onnx-int8"]["machine"] == here


# -- the serving-side re-check, for real ------------------------------------------------------
def _simulated_elsewhere() -> dict:
    """This machine with AVX-512, VNNI and AMX flipped: the CPU a choice was 'made on'."""
    here = machine.describe()
    feats = dict(here["features"])
    for name in ("avx512f", "vnni", "amx"):
        feats[name] = not feats[name]
    return {"cpu_model": "Simulated Xeon", "features": feats, "threads": here["threads"]}


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_checkpoint, small_checkpoint):
    """``onnx`` (chosen): the 4-layer small BERT; ``onnx-int8``: the 2-layer tiny BERT, int8;
    both within budget, both recorded as measured on the simulated machine."""
    from bentos import testing as t

    with tiny_registry(tmp_path_factory, small_checkpoint, MODEL_NAME, "machine-store") as s:
        big, tok = t.load_classifier(small_checkpoint)
        small, _ = t.load_classifier(tiny_checkpoint)
        slow = t.export_onnx(big, tok, s["root"] / "slow.onnx")
        fast = t.quantize_int8(t.export_onnx(small, tok, s["root"] / "fast.onnx"),
                               s["root"] / "fast-int8.onnx")
        table = {"fp32": t.variant_entry("torch", f"models:/{MODEL_NAME}/{s['version']}",
                                         None, texts_per_s=50.0)}
        for name, path, speed in (("onnx", slow, 400.0), ("onnx-int8", fast, 300.0)):
            uri, run_id = t.log_onnx_variant(path, tok, name)
            table[name] = t.variant_entry("onnxruntime", uri, run_id, texts_per_s=speed)
        for entry in table.values():
            entry["machine"] = _simulated_elsewhere()
        t.set_variants(MODEL_NAME, s["version"], table, chosen="onnx")
        yield {**s, "table": table}


@pytest.fixture(autouse=True)
def _use_store(use_module_store):
    """Point each test at the module's store."""


def _config_path(tag: str) -> Path:
    import bentoml

    with bentoml_store_scope():
        return Path(bentoml.bentos.get(tag).path) / "src" / "bento_config.json"


def _config(tag: str) -> dict:
    return json.loads(_config_path(tag).read_text("utf-8"))


@pytest.fixture(scope="module")
def here_bento(store):
    """A bento of the version with its table recorded on this very CPU: it serves ``onnx`` and
    carries ``onnx-int8``, nothing re-timed at build."""
    from bentos import testing as t

    table = json.loads(json.dumps(store["table"]))
    for entry in table.values():
        entry["machine"] = machine.describe()
    t.set_variants(MODEL_NAME, store["version"], table, chosen="onnx")
    try:
        built = build_bento(URI, BentoSettings(workers=2, max_texts=32))
    finally:
        t.set_variants(MODEL_NAME, store["version"], store["table"], chosen="onnx")
    return built


def test_built_on_another_cpu_the_bento_serves_the_fastest_there(store):
    """The build itself times ``onnx`` and ``onnx-int8`` here (the record says another CPU) and
    packages the faster as the served variant, the other as its candidate."""
    built = build_bento(URI, BentoSettings(max_texts=32))
    config = _config(built.bento_tag)
    check = config["machine_check"]
    assert built.variant == config["variant"]["name"] == "onnx-int8"
    assert config["variant"]["onnx"]["dtype"] == "int8"
    assert check["build_check"]["chosen"] == "onnx"
    assert check["build_check"]["chosen_on"]["cpu_model"] == "Simulated Xeon"
    speeds = check["build_check"]["texts_per_s"]
    assert speeds["onnx-int8"] > speeds["onnx"], speeds
    assert check["recorded"] == check["built_on"] == machine.describe()
    assert list(check["candidates"]) == ["onnx"] and len(check["texts"]) == 32


def test_served_on_another_cpu_the_bento_retimes_and_serves_the_fastest(store, here_bento,
                                                                        tmp_path):
    """A bento whose recorded machine is the simulated one (as if built there: its config is
    rewritten), served here: the workers time both variants and all serve ``onnx-int8``."""
    from bentos.server import serve_bento

    path = _config_path(here_bento.bento_tag)
    config = json.loads(path.read_text("utf-8"))
    assert config["variant"]["name"] == "onnx" and config["machine_check"]["build_check"] is None
    assert list(config["machine_check"]["candidates"]) == ["onnx-int8"]
    config["machine_check"]["recorded"] = _simulated_elsewhere()
    path.write_text(json.dumps(config), "utf-8")
    with serve_bento(here_bento.bento_tag, bentoml_home=store["home"],
                     log_path=tmp_path / "serve.log") as srv:
        metas = [httpx.get(f"{srv.url}/metadata", timeout=30).json() for _ in range(6)]
        answer = httpx.post(f"{srv.url}/classify", json={"texts": ["a fine film"]}, timeout=60)
        log = srv.log(100_000)
    assert answer.status_code == 200, answer.text
    meta = metas[0]
    mc = meta["machine_check"]
    assert mc.get("rechecked") is True, (mc, log[-3000:])
    assert mc["chosen"] == "onnx" and mc["served"] == "onnx-int8"
    assert sorted(d[1:] for d in mc["differs"]) == ["amx", "avx512f", "vnni"]
    assert mc["texts_per_s"]["onnx-int8"] > mc["texts_per_s"]["onnx"], mc
    assert meta["variant"] == "onnx-int8" and meta["dtype"] == "int8"
    assert meta["machine"] == machine.describe()
    assert {m["variant"] for m in metas} == {"onnx-int8"}  # every worker serves the same one
    assert "machine check: this CPU" in log and "serving onnx-int8" in log


def test_on_the_recorded_cpu_nothing_is_retimed(store, here_bento):
    """With recorded features equal to this CPU's, the serving side (``maas_machine.choose``,
    with the service's loader over the bento's real model folder) loads only its own choice."""
    import importlib.util

    import bentoml

    from bentos import testing as t

    config = _config(here_bento.bento_tag)
    config["machine_check"]["recorded"] = machine.describe()
    spec = importlib.util.spec_from_file_location(
        "machine_test_runtime",
        Path(__file__).resolve().parents[1] / "bentos/text_classifier/maas_runtime.py")
    rt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rt)
    with bentoml_store_scope():
        model_dir = Path(bentoml.models.get(here_bento.model_tag).path)
    loaded = []

    def loader(variant, folder):
        def load():
            loaded.append(variant["name"])
            return rt.load_runtime(variant, model_dir / folder if folder else model_dir,
                                   config["settings"], config["labels"], 1)
        return load

    runtime, variant, info = machine.choose(config["machine_check"], config["variant"], loader,
                                            key="test-same-cpu")
    assert loaded == ["onnx"] and variant["name"] == "onnx"
    assert info["rechecked"] is False and info["status"] == "same CPU features as the choice"
    assert len(runtime.probabilities(["a fine film"])) == 1
    # the same bento config, recorded elsewhere: both are loaded and timed
    elsewhere = {**config["machine_check"], "recorded": _simulated_elsewhere(), "budget_s": 5}
    loaded.clear()
    runtime, variant, info = machine.choose(elsewhere, config["variant"], loader, key=None)
    assert sorted(loaded) == ["onnx", "onnx-int8"] and info["rechecked"] is True
    assert variant["name"] == info["served"] == "onnx-int8"
    # the in-process service (bentos.testing.load_service) runs the same check
    path = _config_path(here_bento.bento_tag)
    path.write_text(json.dumps(config), "utf-8")
    _, svc = t.load_service(here_bento.bento_tag)
    assert svc.info["variant"] == "onnx" and svc.info["machine_check"]["rechecked"] is False
    assert svc.info["machine"] == machine.describe()


def test_an_explicitly_requested_variant_carries_no_candidates(store):
    built = build_bento(URI, BentoSettings(variant="onnx"))
    assert _config(built.bento_tag)["machine_check"]["candidates"] == {}
