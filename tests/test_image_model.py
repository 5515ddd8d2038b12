"""Image models: the CNN trained on the digits (one model per test run), its ONNX and static
int8 variants, the MLflow pyfunc in a fresh process, the resnet18-style network, fine-tuning
from a safetensors checkpoint, augmentation and the family's options."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from image_support import DIGITS, copy_digits, digits_setup, pipeline_cfg, trained_digits

from pipelines.families.image_classifier import model as mdl


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """(family, dataset, trained model, test inputs, test truth) shared by the module."""
    family, data = digits_setup()
    model = mdl.load(trained_digits(tmp_path_factory))
    x = np.stack(family.inputs(data.test))
    return family, data, model, x, np.array(data.names(data.test))


def _accuracy(model, probs, truth) -> float:
    return float(np.mean(np.array(model.labels)[probs.argmax(axis=1)] == truth))


def test_cnn_learns_the_digits(digits):
    family, _, model, x, truth = digits
    assert model.spec["arch"] == "cnn" and model.spec["in_channels"] == 1
    assert [type(m).__name__ for m in model.net.features] == [
        "Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d"]
    assert model.net.features[0].out_channels == 32 and model.net.features[3].out_channels == 64
    probs = family.predict_proba(model, list(x))
    assert probs.shape == (360, 10)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert _accuracy(model, probs, truth) >= 0.9


def test_onnx_and_static_int8_variants(digits, tmp_path):
    import onnx

    family, data, model, x, truth = digits
    comp = family.compressor(model, data, tmp_path)
    fp32 = comp.build("fp32")
    ref = _accuracy(model, fp32.clf.predict_proba(list(x)), truth)
    sizes = {}
    for name in ("onnx", "onnx-int8"):
        v = comp.build(name)
        assert v.runtime == "onnxruntime"
        acc = _accuracy(model, v.clf.predict_proba(list(x)), truth)
        assert abs(acc - ref) <= 0.02, (name, acc, ref)
        sizes[name] = v.size_mb
    graph = onnx.load(str(tmp_path / "onnx-int8.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops  # QDQ around the convolutions
    per_channel = [n for n in graph.node if n.op_type == "DequantizeLinear"
                   and any(a.name == "axis" for a in n.attribute)]
    assert per_channel, "expected per-channel weight scales"
    assert sizes["onnx-int8"] < sizes["onnx"] / 2
    assert comp.build("onnx").settings == {"providers": ["CPUExecutionProvider"]}
    assert fp32.settings == {} and comp.calibration.shape[0] == 256
    with pytest.raises(ValueError, match="not 'pruned'"):
        comp.build("pruned")


@pytest.mark.slow  # a fresh Python process importing mlflow and torch
def test_pyfunc_predicts_in_a_fresh_process(digits, mlflow_store, tmp_path):
    import mlflow

    family, data, model, x, truth = digits
    with mlflow.start_run():
        info = family.log_model(model, "model")
    sig = info.signature.to_dict()
    assert json.loads(sig["inputs"])[0]["tensor-spec"]["shape"] == [-1, 1, 8, 8]
    assert info.metadata["labels"] == [str(i) for i in range(10)]
    np.save(tmp_path / "x.npy", x[:20])
    script = ("import sys, mlflow, numpy as np\n"
              "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
              "print(','.join(m.predict(np.load(sys.argv[2]))['label']))\n")
    out = subprocess.run([sys.executable, "-c", script, info.model_uri, str(tmp_path / "x.npy")],
                         capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    expected = np.array(model.labels)[family.predict_proba(model, list(x[:20])).argmax(axis=1)]
    assert out.stdout.strip().splitlines()[-1].split(",") == list(expected)
    # the family reads it back, and nothing in the logged model is a pickle
    again = family.load_logged(info.model_uri)
    assert np.allclose(family.predict_proba(again, list(x[:5])),
                       family.predict_proba(model, list(x[:5])), atol=1e-6)
    local = mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "dl"))
    from pathlib import Path

    names = {p.name for p in Path(local).rglob("*") if p.is_file()}
    assert {"model.safetensors", "maas_nets.py", "maas_variant.json"} <= names
    assert not [n for n in names if n.endswith((".pkl", ".pickle", ".pt", ".pth", ".bin"))]


def test_resnet18_small_trains(tmp_path):
    from pipelines.data import load_data, split_data
    from pipelines.families import load_family

    folder = copy_digits(tmp_path / "train", classes=(0, 1, 2), per_class=16)
    cfg = pipeline_cfg(folder, model_options={"arch": "resnet18"})
    family = load_family(cfg)
    data = split_data(load_data(cfg.data, family), cfg.data)
    trainer = family.trainer(data, {"width": 8, "learning_rate": 3e-3}, seed=1)
    net = trainer.model.net
    assert type(net).__name__ == "ResNet18Small"
    assert sum(1 for m in net.modules() if type(m).__name__ == "BasicBlock") == 8
    assert net.stem[0].stride == (1, 1)  # small-input stem: no downsampling before the stages
    losses = [trainer.train_epoch() for _ in range(4)]
    assert losses[-1] < losses[0]
    probs = family.predict_proba(trainer.model, family.inputs(data.validation))
    assert probs.shape == (len(data.validation), 3)


def test_fine_tune_from_a_checkpoint(digits, tmp_path):
    import torch

    from pipelines.data import load_data, split_data
    from pipelines.families import load_family

    _, _, model, _, _ = digits
    mdl.save(model, tmp_path / "ckpt")
    folder = copy_digits(tmp_path / "train", classes=(3, 5, 8), per_class=10)
    (tmp_path / "pipe").mkdir()
    cfg = pipeline_cfg(folder, source=tmp_path / "pipe" / "p.yaml",
                       model_options={"checkpoint": "../ckpt/model.safetensors"},
                       data_options={"image_size": 8})
    family = load_family(cfg)
    family.check()
    data = split_data(load_data(cfg.data, family), cfg.data)
    trainer = family.trainer(data, {}, seed=3)
    tuned = trainer.model.net
    assert torch.equal(tuned.features[0].weight, model.net.features[0].weight)  # loaded
    assert tuned.head[-1].out_features == 3  # new head for 3 classes
    assert family.card_facts()["from_scratch"] is False
    bad = pipeline_cfg(folder, model_options={"checkpoint": str(tmp_path / "w.bin")})
    with pytest.raises(mdl.CheckpointError, match=r"w\.bin is not a \.safetensors file"):
        load_family(bad).check()


def test_random_shift_moves_pixels_with_zero_fill():
    import torch

    from pipelines.families.image_classifier.train import random_shift

    batch = torch.ones(16, 1, 6, 6)
    gen = torch.Generator().manual_seed(0)
    assert random_shift(batch, 0, gen) is batch
    shifted = random_shift(batch, 2, gen)
    assert shifted.shape == batch.shape
    zeros = (shifted == 0).flatten(1).sum(dim=1)
    assert (zeros > 0).any() and (zeros <= 6 * 6 - 4 * 4).all()


@pytest.mark.parametrize("options, match", [
    ({"model": {"arch": "vgg"}}, "model.options.arch"),
    ({"model": {"colour": 1}}, "model.options.colour"),
    ({"data": {"channels": 2}}, "data.options.channels"),
    ({"data": {"image_size": 2}}, "data.options.image_size"),
])
def test_bad_options_are_config_errors(options, match):
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        pipeline_cfg(DIGITS / "train", model_options=options.get("model"),
                     data_options=options.get("data"))
