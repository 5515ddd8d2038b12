"""The distilled variant (pipelines.distillation): which layers a student keeps, that it really
has fewer, starts from the teacher's own layers, trains within its time budget, reloads and exports
like the teacher; the compressor builds distilled / distilled+onnx-int8 from one student."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
from helpers import REPO, SST2

from pipelines.config import DistillationConfig


@pytest.mark.parametrize("n, layers, keep", [
    (6, None, [1, 3, 5]), (12, None, [1, 3, 5, 7, 9, 11]), (5, None, [0, 2, 4]),
    (2, None, [1]), (6, 2, [2, 5]), (6, 3, [1, 3, 5]), (6, 1, [5]), (6, [0, 5], [0, 5]),
    (6, [5, 0, 5], [0, 5]),
])
def test_kept_layers(n, layers, keep):
    from pipelines.distillation import keep_layers

    assert keep_layers(n, layers) == keep


@pytest.mark.parametrize("n, layers, message", [
    (6, 6, "6 layers of the teacher's 6"), (6, 0, "must be 1..5"),
    (6, [0, 6], "0..5"), (6, [0, 1, 2, 3, 4, 5], "1..5 distinct"), (6, [], "1..5 distinct"),
])
def test_unusable_layer_settings_are_named(n, layers, message):
    from pipelines.distillation import keep_layers

    with pytest.raises(ValueError, match="compression.distillation.layers") as err:
        keep_layers(n, layers)
    assert message in str(err.value)


def test_a_one_layer_teacher_has_nothing_to_drop():
    from pipelines.distillation import NotApplicable, keep_layers

    with pytest.raises(NotApplicable, match="nothing to drop"):
        keep_layers(1, None)


@pytest.fixture(scope="module")
def teacher(tiny_checkpoint):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_checkpoint, num_labels=2, use_safetensors=True).eval()
    return model, AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def texts():
    with open(SST2 / "train_sample.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))[:48]
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


def test_student_keeps_the_teacher_layers_it_names(teacher):
    import torch

    from pipelines.distillation import make_student

    model, _ = teacher
    student = make_student(model, [1])
    assert student.config.num_hidden_layers == 1 and model.config.num_hidden_layers == 2
    assert len(student.bert.encoder.layer) == 1 and len(model.bert.encoder.layer) == 2
    for (name, w), (_, ref) in zip(student.bert.encoder.layer[0].named_parameters(),
                                   model.bert.encoder.layer[1].named_parameters(), strict=True):
        assert torch.equal(w, ref), name
        assert w.data_ptr() != ref.data_ptr()  # a copy: training it leaves the teacher alone


def test_distill_trains_a_smaller_student_and_leaves_the_teacher(teacher, texts, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    from pipelines.distillation import distill

    model, tok = teacher
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xs, ys = texts
    extra = ["an unlabelled sentence for the teacher to label", "another one , longer than it"]
    s = DistillationConfig(epochs=2, learning_rate=5e-4)
    res = distill(model, tok, xs + extra, ys + [-100] * len(extra), s, max_length=32, seed=1)
    assert res.model.config.num_hidden_layers == 1
    assert res.details["layers_kept"] == [1] and res.details["layers"] == "2->1"
    assert res.details["params_after"] < res.details["params_before"]
    assert res.details["unlabelled_texts"] == 2 and res.details["epochs_run"] == 2
    losses = res.details["distill_loss"]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    res.model.save_pretrained(tmp_path / "student", safe_serialization=True)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student").eval()
    enc = tok(xs[:4], padding=True, return_tensors="pt")
    with torch.inference_mode():
        assert torch.allclose(again(**enc).logits, res.model(**enc).logits, atol=1e-5)


def test_a_budget_too_small_for_one_epoch_is_refused_with_the_projection(teacher, texts):
    from pipelines.distillation import NotApplicable, distill

    model, tok = teacher
    xs, ys = texts
    s = DistillationConfig(time_budget_s=1e-3)
    with pytest.raises(NotApplicable, match=r"one distillation epoch would take ~\d+ s .*"
                                            r"time_budget_s = 0.001 s"):
        distill(model, tok, xs * 4, ys * 4, s, max_length=32, seed=1, batch_size=8)


def test_a_model_without_a_layer_list_is_named():
    import torch

    from pipelines.distillation import NotApplicable, make_student

    model = torch.nn.Linear(4, 2)
    model.config = SimpleNamespace(num_hidden_layers=3)
    with pytest.raises(NotApplicable, match="Linear has no nn.ModuleList of num_hidden_layers=3"):
        make_student(model, [0])


def test_compressor_builds_distilled_and_its_int8_graph_from_one_student(teacher, texts,
                                                                          tmp_path):
    import numpy as np
    import pandas as pd
    from helpers import write_pipeline

    from pipelines.config import PipelineConfig
    from pipelines.families.text_classifier_variants import TextCompressor

    model, tok = teacher
    xs, ys = texts
    unlabelled = tmp_path / "more.txt"
    unlabelled.write_text("more text for the teacher\n\n  and another line  \n", "utf-8")
    cfg = PipelineConfig.load(write_pipeline(
        tmp_path, "x", compression={"distillation": {"epochs": 1,
                                                     "unlabelled_path": "more.txt"}}))
    assert cfg.compression.distillation.unlabelled_path == unlabelled.resolve()
    frame = pd.DataFrame({"text": xs, "label": ys})
    data = SimpleNamespace(train=frame, ids=lambda rows: list(rows.label))
    comp = TextCompressor(cfg, data, model, tok, tmp_path)
    torch_v = comp.build("distilled")
    int8 = comp.build("distilled+onnx-int8")
    assert torch_v.runtime == "torch" and int8.runtime == "onnxruntime"
    assert torch_v.settings["distillation.layers"] == "2->1"
    assert int8.settings["distillation.layers_kept"] == [1]
    assert int8.settings["distillation.unlabelled_texts"] == 2
    assert torch_v.artifact is comp.student("distilled")[0]  # one student for both
    a, b = torch_v.clf.predict_proba(xs[:8]), int8.clf.predict_proba(xs[:8])
    assert a.shape == b.shape == (8, 2) and np.allclose(a.sum(1), 1, atol=1e-5)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.75


@pytest.mark.parametrize("deadline, elapsed, budget", [
    (None, 500.0, 300.0),    # no deadline: the budget as written
    (600.0, 200.0, 300.0),   # 400 s left: more than the budget, unchanged
    (480.0, 330.0, 150.0),   # 150 s left: capped
    (480.0, 479.0, 1.0),     # 1 s left
    (480.0, 600.0, 1e-3),    # past it: a budget no epoch fits (the student is not made)
])
def test_the_run_deadline_caps_the_distillation_budget(deadline, elapsed, budget):
    from pipelines.config import PipelineConfig
    from pipelines.config_compression import within_run_deadline

    base = PipelineConfig.load(REPO / "pipelines" / "sentiment.yaml")
    d = DistillationConfig(time_budget_s=300, run_deadline_s=deadline)
    cfg = base.model_copy(update={"compression": base.compression.model_copy(
        update={"distillation": d})})
    out = within_run_deadline(cfg, elapsed)
    assert out.compression.distillation.time_budget_s == pytest.approx(budget)
    assert (out is cfg) == (budget == 300.0)
    assert out.compression.distillation.layers == cfg.compression.distillation.layers
    assert cfg.compression.distillation.time_budget_s == 300.0  # the run's own config untouched


def test_a_family_copy_reading_the_capped_config_distils_under_it(tmp_path):
    """What steps.compress hands compression: a family copy reading the capped config. Its
    compressor (which distils) sees the capped budget; the run's family and config stay."""
    from types import SimpleNamespace as NS

    from pipelines.config import PipelineConfig
    from pipelines.config_compression import within_run_deadline
    from pipelines.families import load_family

    cfg = PipelineConfig.load(REPO / "pipelines" / "sentiment.yaml")
    family = load_family(cfg)
    capped = within_run_deadline(cfg, cfg.compression.distillation.run_deadline_s - 42.0)
    assert capped.compression.distillation.time_budget_s == pytest.approx(42.0)
    copy = family.configured(capped)
    comp = copy.compressor(NS(model=None, tokenizer=None), None, tmp_path / "v")
    assert comp.cfg.compression.distillation.time_budget_s == pytest.approx(42.0)
    assert family.cfg is cfg and cfg.compression.distillation.time_budget_s == 300
    assert family.configured(cfg) is family


def test_a_capped_budget_names_the_run_deadline(teacher, texts):
    from pipelines.distillation import NotApplicable, distill

    model, tok = teacher
    xs, ys = texts
    s = DistillationConfig(time_budget_s=1e-3, run_deadline_s=480)
    with pytest.raises(NotApplicable, match=r"left of run_deadline_s = 480 s"):
        distill(model, tok, xs * 4, ys * 4, s, max_length=32, seed=1, batch_size=8)
