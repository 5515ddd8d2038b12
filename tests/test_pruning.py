"""Structured pruning (pipelines.pruning) on the tiny BERT: weights really removed, the smaller
model reloads (safetensors, MLflow transformers flavour), exports to ONNX, the teacher is untouched
and the recovery fine-tune trains."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from helpers import SST2

NUM_LABELS = 3  # not 2: the pruner must keep any classification head's output size


@pytest.fixture(scope="module")
def teacher(tiny_checkpoint):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_checkpoint, num_labels=NUM_LABELS, ignore_mismatched_sizes=True,
        use_safetensors=True).eval()
    return model, AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def data():
    with open(SST2 / "train_sample.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))[:64]
    texts = [r["sentence"] for r in rows]
    return texts, [(int(r["label"]) + len(t)) % NUM_LABELS
                   for r, t in zip(rows, texts, strict=True)]


@pytest.fixture(scope="module")
def pruned(teacher, data):
    from pipelines.pruning import prune_and_recover

    model, tok = teacher
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune_and_recover(model, tok, *data, attention=0.5, ffn=0.5, recovery_epochs=2,
                               max_length=32, batch_size=16, learning_rate=1e-3, seed=0)
    return result, before


@pytest.fixture(scope="module")
def ffn_pruned(teacher, data):
    """FFN neurons only (the default structure), in two steps, hidden-state distillation on."""
    from pipelines.pruning import prune_and_recover

    return prune_and_recover(teacher[0], teacher[1], *data, attention=0.0, ffn=0.5, steps=2,
                             recovery_epochs=2, max_length=32, batch_size=16, learning_rate=1e-3,
                             seed=0, distill_hidden=10.0)


def _encode(tok, texts=("a gripping, funny film", "dull", "not bad at all , really")):
    return tok(list(texts), padding=True, return_tensors="pt", return_token_type_ids=True)


def _logits(model, enc):
    import torch

    with torch.no_grad():
        return model.eval()(**enc).logits.numpy()


def test_parameters_are_really_removed(pruned, teacher):
    from transformers import BertForSequenceClassification

    result, _ = pruned
    model, cfg = result.model, result.model.config
    # amount=0.5 of 2 heads x 16: one head, hidden 16, FFN 32 (of 64), both layers kept
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size,
            cfg.num_hidden_layers, cfg.num_labels) == (16, 1, 32, 2, NUM_LABELS)
    layer = model.bert.encoder.layer[1]
    assert tuple(model.bert.embeddings.word_embeddings.weight.shape) == (cfg.vocab_size, 16)
    assert tuple(layer.attention.self.query.weight.shape) == (16, 16)
    assert tuple(layer.intermediate.dense.weight.shape) == (32, 16)
    assert tuple(layer.output.dense.weight.shape) == (16, 32)
    assert tuple(model.classifier.weight.shape) == (NUM_LABELS, 16)
    # dense: exactly the parameters of a BERT built from the new config (no masks, no extras)
    fresh = sum(p.numel() for p in BertForSequenceClassification(cfg).parameters())
    assert result.params_after == sum(p.numel() for p in model.parameters()) == fresh
    assert result.params_before == sum(p.numel() for p in teacher[0].parameters())
    assert result.params_after < 0.55 * result.params_before  # embeddings halve too (no vocab cut)
    assert result.nonembedding_after < 0.35 * result.nonembedding_before  # ~quadratic in width
    assert result.details["num_attention_heads"] == "2->1"
    assert result.details["hidden_size"] == "32->16"


def test_input_model_is_untouched(pruned, teacher):
    import torch

    result, before = pruned
    model, _ = teacher
    after = model.state_dict()
    assert model.config.hidden_size == 32 and model.config.num_attention_heads == 2
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert result.model is not model and not result.model.training


def test_save_pretrained_round_trip(pruned, teacher, tmp_path):
    from transformers import AutoModelForSequenceClassification

    result, _ = pruned
    result.model.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, use_safetensors=True)
    enc = _encode(teacher[1])
    assert reloaded.config.hidden_size == 16
    np.testing.assert_allclose(_logits(reloaded, enc), _logits(result.model, enc), atol=1e-5)


def test_mlflow_transformers_round_trip(pruned, teacher, mlflow_store):
    import mlflow

    from pipelines.families.text_classifier import load_logged, log_model

    result, _ = pruned
    tok = teacher[1]
    with mlflow.start_run():  # the platform's call: mlflow.transformers.log_model(...)
        info = log_model(result.model, tok, "pruned", ["a fine film", "dull"])
    reloaded, _ = load_logged(info.model_uri)  # mlflow.transformers.load_model(components)
    assert reloaded.config.intermediate_size == 32
    enc = _encode(tok)
    np.testing.assert_allclose(_logits(reloaded, enc), _logits(result.model, enc), atol=1e-5)


def test_onnx_export_matches_torch(pruned, teacher, tmp_path):
    import onnxruntime as ort
    import torch

    result, _ = pruned
    names = ["input_ids", "attention_mask", "token_type_ids"]
    enc = _encode(teacher[1], ("short", "a somewhat longer sentence to pad"))
    path = tmp_path / "pruned.onnx"
    with torch.no_grad():
        torch.onnx.export(result.model.eval(), tuple(enc[n] for n in names), str(path),
                          input_names=names, output_names=["logits"],
                          dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names},
                                        "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = _encode(teacher[1])  # another batch and sequence length than the export's
    got = session.run(["logits"], {n: other[n].numpy() for n in names})[0]
    assert got.shape == (3, NUM_LABELS)
    np.testing.assert_allclose(got, _logits(result.model, other), atol=1e-4)


def test_recovery_trains(pruned, teacher, data):
    import torch

    from pipelines.pruning import prune_and_recover

    result, _ = pruned
    losses = result.details["recovery_loss"]
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[-1] > 0
    # same seed, same pruning, no recovery: the recovered weights must differ from these
    untrained = prune_and_recover(teacher[0], teacher[1], *data, attention=0.5, ffn=0.5,
                                  recovery_epochs=0, max_length=32, batch_size=16, seed=0).model
    assert untrained.config.hidden_size == 16
    a, b = untrained.state_dict(), result.model.state_dict()
    changed = [k for k in a if a[k].shape == b[k].shape and not torch.equal(a[k], b[k])]
    assert "classifier.weight" in changed
    assert "bert.encoder.layer.0.intermediate.dense.weight" in changed


def test_unsupported_architecture_is_named():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from pipelines.pruning import prune_and_recover

    model = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=100, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=16))
    with pytest.raises(ValueError, match="DistilBertForSequenceClassification"):
        prune_and_recover(model, None, ["a"], [0])


def test_ffn_only_keeps_heads_and_hidden(ffn_pruned, teacher, tmp_path):
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    model, cfg = ffn_pruned.model, ffn_pruned.model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size,
            cfg.num_hidden_layers) == (32, 2, 32, 2)
    for layer in model.bert.encoder.layer:
        assert tuple(layer.attention.self.query.weight.shape) == (32, 32)
        assert tuple(layer.intermediate.dense.weight.shape) == (32, 32)
        assert tuple(layer.output.dense.weight.shape) == (32, 32)
    fresh = sum(p.numel() for p in BertForSequenceClassification(cfg).parameters())
    assert ffn_pruned.params_after == fresh
    # exactly the FFN weights go: 2 layers x (32 x 32 in + 32 bias + 32 x 32 out)
    assert ffn_pruned.params_before - ffn_pruned.params_after == 2 * (2 * 32 * 32 + 32)
    assert ffn_pruned.details["intermediate_size"] == "64->32"
    assert ffn_pruned.details["distill_hidden"] == 10.0
    assert len(ffn_pruned.details["recovery_loss"]) == 2  # one epoch after each of 2 steps
    model.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, use_safetensors=True)
    enc = _encode(teacher[1])
    np.testing.assert_allclose(_logits(reloaded, enc), _logits(model, enc), atol=1e-5)


def test_hidden_state_distillation_changes_the_recovery(ffn_pruned, teacher, data):
    import torch

    from pipelines.pruning import prune_and_recover

    plain = prune_and_recover(teacher[0], teacher[1], *data, attention=0.0, ffn=0.5, steps=2,
                              recovery_epochs=2, max_length=32, batch_size=16,
                              learning_rate=1e-3, seed=0, distill_hidden=0.0)
    assert plain.details["distill_hidden"] == 0.0
    a, b = plain.model.state_dict(), ffn_pruned.model.state_dict()
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)
    # the hidden-state term is part of the loss: the same run reports a larger loss with it
    assert ffn_pruned.details["recovery_loss"][0] > plain.details["recovery_loss"][0]


def test_hidden_state_distillation_is_off_when_the_width_changes(pruned):
    result, _ = pruned  # attention=0.5 halves the hidden width: no teacher states to match
    assert result.details["distill_hidden"] == 0.0


@pytest.mark.parametrize("kwargs, message", [
    ({"attention": 0.0, "ffn": 0.0}, "nothing to prune"),
    ({"ffn": 1.0}, "ffn must be in"),
    ({"attention": -0.1}, "attention must be in"),
    ({"steps": 0}, "steps must be >= 1"),
])
def test_bad_arguments_are_named(teacher, data, kwargs, message):
    from pipelines.pruning import prune_and_recover

    with pytest.raises(ValueError, match=message):
        prune_and_recover(teacher[0], teacher[1], *data, **kwargs)


def test_pruning_config_fields_and_shorthand():
    from pipelines.config import ConfigError, PipelineConfig, PruningConfig

    assert PruningConfig(amount=0.25).attention == PruningConfig(amount=0.25).ffn == 0.25
    default = PruningConfig()
    assert (default.attention, default.ffn) == (0.0, 0.5) and default.distill_hidden > 0
    base = {"name": "p", "data": {"path": str(SST2 / "train_sample.tsv"), "format": "tsv",
                                  "text_column": "sentence", "label_column": "label"}}
    for pruning, where in [({"ffn": 1.5}, "compression.pruning.ffn"),
                           ({"amount": 0.3, "ffn": 0.5}, "compression.pruning"),
                           ({"attention": 0, "ffn": 0}, "compression.pruning"),
                           ({"distill_hidden": -1}, "compression.pruning.distill_hidden")]:
        with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
            PipelineConfig.from_dict({**base, "compression": {"pruning": pruning}})
