"""Drift at promotion: the pure figures and verdicts (table tests), the profile artifact, and two
real pipeline runs where the second trains on shifted data (a class mostly removed, texts of
another kind) and, in block mode, is not promoted."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from helpers import REPO, SST2, write_pipeline
from mlflow import MlflowClient

from pipelines.config import ConfigError, PipelineConfig
from registry import Decision, should_promote, with_drift
from validation.drift import (
    FIGURES,
    DataProfile,
    DriftThresholds,
    compare,
    profile_data,
    word_hash,
)

# ---- profiles --------------------------------------------------------------------------------


def test_profile_counts_labels_lengths_and_hashed_words():
    p = profile_data(["Good film", "good, GOOD plot", "bad"], ["pos", "pos", "neg"])
    assert p.rows == 3 and p.labels == {"neg": 1, "pos": 2}
    assert p.lengths == {3: 1, 9: 1, 15: 1}
    assert p.n_tokens == 6 and p.n_hapax == 3  # film, plot, bad once; good three times
    assert p.vocab == {word_hash("good"): 3, word_hash("film"): 1, word_hash("plot"): 1,
                       word_hash("bad"): 1}
    assert all(re.fullmatch(r"[0-9a-f]{16}", h) for h in p.vocab)
    assert p.salt_id == "" and not p.vocab_truncated


def test_profile_json_holds_no_words_and_round_trips():
    texts = ["a charming canaryword journey", "bleak and desperate"]
    p = profile_data(texts, [1, 0])
    blob = json.dumps(p.to_dict())
    for word in ("charming", "canaryword", "journey", "bleak", "desperate"):
        assert word not in blob
    assert DataProfile.from_dict(json.loads(blob)) == p


def test_profile_salt_changes_hashes_and_is_recorded():
    plain, salted = profile_data(["word"], ["x"]), profile_data(["word"], ["x"], salt="s3cret")
    assert set(plain.vocab).isdisjoint(salted.vocab)
    assert salted.salt_id and salted.salt_id != plain.salt_id and "s3cret" not in salted.salt_id


def test_profile_vocab_cap_keeps_most_frequent_and_counts_before_the_cap():
    p = profile_data(["a a a b b c"], ["x"], max_vocab=2)
    assert p.vocab == {word_hash("a"): 3, word_hash("b"): 2}
    assert p.vocab_truncated and p.n_tokens == 6 and p.n_hapax == 1


@pytest.mark.parametrize("bad, field", [
    ({"schema": 2}, "profile.schema"),
    ({"schema": 1, "rows": 1}, "profile.labels"),
    ({"schema": 1, "rows": 1, "labels": {}, "lengths": {"x": 1}, "vocab": {}, "n_tokens": 0,
      "n_hapax": 0}, "profile: malformed"),
])
def test_profile_from_dict_names_the_bad_field(bad, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        DataProfile.from_dict(bad)


def test_profile_needs_one_label_per_text():
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        profile_data(["a", "b"], ["x"])


# ---- figures ---------------------------------------------------------------------------------


def _prof(labels: dict[str, int], lengths: dict[int, int] | None = None,
          words: dict[str, int] | None = None, salt: str = "") -> DataProfile:
    """A profile built from counts (as profile_data would make it)."""
    words = words or {"w": 10}
    return DataProfile(rows=sum(labels.values()), labels=labels, lengths=lengths or {10: 10},
                       vocab={word_hash(w, salt): c for w, c in words.items()},
                       n_tokens=sum(words.values()),
                       n_hapax=sum(1 for c in words.values() if c == 1),
                       salt_id="" if not salt else "salted")


BALANCED = {"neg": 500, "pos": 500}
# one row per case: reference, current, figure, expected value (None: not computed), breached
FIGURE_CASES = {
    "same labels": (_prof(BALANCED), _prof(BALANCED), "label_tvd", 0.0, False),
    "class mostly removed": (_prof(BALANCED), _prof({"neg": 50, "pos": 950}), "label_tvd",
                             0.45, True),
    "class gone, third class new": (_prof({"a": 100, "b": 100}), _prof({"b": 100, "c": 100}),
                                    "label_tvd", 0.5, True),
    # large sample: p ~ 1e-5 but one point of shift is no drift worth a block
    "significant but small": (_prof({"neg": 50_000, "pos": 50_000}),
                              _prof({"neg": 49_000, "pos": 51_000}), "label_tvd", 0.01, False),
    # small sample: a 30-point shift on 10 rows each is not significant at alpha 0.01
    "large but not significant": (_prof({"neg": 5, "pos": 5}), _prof({"neg": 2, "pos": 8}),
                                  "label_tvd", 0.3, False),
    "same lengths": (_prof(BALANCED, {10: 500, 20: 500}), _prof(BALANCED, {10: 500, 20: 500}),
                     "length_ks", 0.0, False),
    "longer texts": (_prof(BALANCED, {10: 500, 20: 500}), _prof(BALANCED, {20: 500, 40: 500}),
                     "length_ks", 0.5, True),
    # 100 seen words, 10 of them once: expected OOV 10/1090; all current words are known
    "known words": (_prof(BALANCED, words={**{f"w{i}": 12 for i in range(90)},
                                           **{f"h{i}": 1 for i in range(10)}}),
                    _prof(BALANCED, words={"w1": 50, "w2": 50}), "oov_increase",
                    -10 / 1090, False),
    "another domain": (_prof(BALANCED, words={"w1": 50, "w2": 50}),
                       _prof(BALANCED, words={"w1": 50, "zz": 50}), "oov_increase", 0.5, True),
    "different salts": (_prof(BALANCED), _prof(BALANCED, salt="s"), "oov_increase", None, False),
    "no reference": (None, _prof(BALANCED), "label_tvd", None, False),
}


@pytest.mark.parametrize("case", FIGURE_CASES)
def test_figure_table(case):
    ref, cur, name, value, breached = FIGURE_CASES[case]
    fig = compare(ref, cur).figure(name)
    if value is None:
        assert fig.value is None and "not computed" in fig.reason
    else:
        assert fig.value == pytest.approx(value, abs=1e-9)
    assert fig.breached is breached
    assert fig.threshold == DriftThresholds().limit(name)


def test_label_figure_records_chi_square_and_cramers_v():
    fig = compare(_prof(BALANCED), _prof({"neg": 50, "pos": 950})).figure("label_tvd")
    from scipy.stats import chi2_contingency

    res = chi2_contingency([[500, 500], [50, 950]], correction=False)
    assert fig.p_value == pytest.approx(res.pvalue)
    assert fig.details["chi2"] == pytest.approx(res.statistic)
    assert fig.details["cramers_v"] == pytest.approx(math.sqrt(res.statistic / 2000))
    assert "label_tvd 0.4500 > 0.1" in fig.reason


PRED_CASES = {
    # reference predictions, current predictions, pred_label_tvd, disagreement, breached names
    "identical": (["a", "b"] * 50, ["a", "b"] * 50, 0.0, 0.0, ()),
    "swapped labels, same shares": (["a", "b"] * 50, ["b", "a"] * 50, 0.0, 1.0,
                                    ("disagreement",)),
    "all one class": (["a", "b"] * 50, ["a"] * 100, 0.5, 0.5,
                      ("pred_label_tvd", "disagreement")),
    "a few flips": (["a", "b"] * 50, ["a", "b"] * 45 + ["b", "a"] * 5, 0.0, 0.1, ()),
}


@pytest.mark.parametrize("case", PRED_CASES)
def test_prediction_figures(case):
    ref_p, cur_p, tvd, disagreement, breached = PRED_CASES[case]
    report = compare(_prof(BALANCED), _prof(BALANCED), ref_p, cur_p)
    assert report.figure("pred_label_tvd").value == pytest.approx(tvd)
    assert report.figure("disagreement").value == pytest.approx(disagreement)
    assert report.breached == breached
    assert report.status == ("drift" if breached else "ok")


def test_predictions_must_cover_the_same_texts():
    with pytest.raises(ValueError, match="3 reference vs 2 current"):
        compare(None, _prof(BALANCED), ["a", "b", "a"], ["a", "b"])


def test_no_reference_still_compares_predictions_and_is_no_reference_when_quiet():
    quiet = compare(None, _prof(BALANCED), ["a"] * 10, ["a"] * 10)
    assert quiet.status == "no_reference" and not quiet.breached and not quiet.blocks("block")
    assert [f.name for f in quiet.figures] == list(FIGURES)
    loud = compare(None, _prof(BALANCED), ["a"] * 10, ["b"] * 10)
    assert loud.status == "drift" and "disagreement" in loud.breached


def test_thresholds_are_configurable():
    ref, cur = _prof(BALANCED), _prof({"neg": 50, "pos": 950})
    assert compare(ref, cur, thresholds=DriftThresholds(max_label_tvd=0.5)).breached == ()
    assert compare(ref, cur, thresholds=DriftThresholds(alpha=1e-300)).breached == ()


@pytest.mark.parametrize("breached, mode, blocks", [
    (False, "warn", False), (False, "block", False), (True, "warn", False), (True, "block", True),
])
def test_blocks_only_a_breach_in_block_mode(breached, mode, blocks):
    cur = _prof({"neg": 50, "pos": 950} if breached else BALANCED)
    assert compare(_prof(BALANCED), cur).blocks(mode) is blocks


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="'warn' or 'block'"):
        compare(_prof(BALANCED), _prof(BALANCED)).blocks("stop")


def test_tags_and_summary():
    report = compare(_prof(BALANCED), _prof({"neg": 50, "pos": 950}), ["a"] * 4, ["a"] * 4)
    tags = report.to_tags()
    assert tags["maas.drift.status"] == "drift"
    assert tags["maas.drift.breached"] == "label_tvd"
    assert tags["maas.drift.label_tvd"] == "0.450000"
    assert tags["maas.drift.label_tvd.threshold"] == "0.1"
    assert tags["maas.drift.label_tvd.breached"] == "true"
    assert float(tags["maas.drift.label_tvd.p_value"]) < 1e-10
    assert tags["maas.drift.disagreement"] == "0.000000"
    assert "maas.drift.disagreement.p_value" not in tags  # no test for it
    assert tags["maas.drift.reason"] == report.summary()
    assert report.summary().startswith("drift in label_tvd: label_tvd 0.450 (p=")
    assert "\n" not in report.summary()
    json.dumps(report.to_dict())  # JSON-serialisable


# ---- the decision ----------------------------------------------------------------------------


def _decision(promote: bool) -> Decision:
    return should_promote({"accuracy": 0.9 if promote else 0.7}, {"accuracy": 0.8}, "accuracy")


WITH_DRIFT_CASES = [
    # metric gate, breached, block -> promote, reason must start with, and contain
    (True, False, False, True, "promote:", "; drift: S"),
    (True, False, True, True, "promote:", "; drift: S"),
    (True, True, False, True, "promote:", "; drift warning (mode warn, not blocking): S"),
    (True, True, True, False, "reject: drift blocks promotion (S); metrics alone: promote:", ""),
    (False, True, True, False, "reject:", "; drift blocks promotion too (S)"),
    (False, True, False, False, "reject:", "; drift warning"),
    (False, False, True, False, "reject:", "; drift: S"),
]


@pytest.mark.parametrize("gate, breached, block, promote, starts, contains", WITH_DRIFT_CASES)
def test_with_drift(gate, breached, block, promote, starts, contains):
    before = _decision(gate)
    after = with_drift(before, "S", breached=breached, block=block)
    assert after.promote is promote
    assert after.reason.startswith(starts) and contains in after.reason
    assert before.reason in after.reason  # the metric gate's reason is kept
    assert (after.metric, after.candidate, after.incumbent) == ("accuracy", before.candidate, 0.8)
    assert before.promote is gate  # the input is unchanged (frozen)


# ---- config ----------------------------------------------------------------------------------


def _cfg(**drift) -> dict:
    return {"name": "t", "data": {"path": "x.tsv"}, "registry": {"model_name": "m"},
            "tuning": {"search_space": {"lr": {"type": "float", "low": 0.1, "high": 1.0}}},
            "promotion": {"drift": drift}}


def test_drift_config_defaults_and_field_path_errors():
    cfg = PipelineConfig.from_dict(_cfg())
    assert cfg.promotion.drift.enabled and cfg.promotion.drift.mode == "warn"
    assert cfg.promotion.drift.max_label_tvd == DriftThresholds().max_label_tvd
    with pytest.raises(ConfigError, match=r"promotion\.drift\.mode: Input should be 'warn' or"):
        PipelineConfig.from_dict(_cfg(mode="stop"))
    with pytest.raises(ConfigError, match=r"promotion\.drift\.max_label_tvd: "):
        PipelineConfig.from_dict(_cfg(max_label_tvd=2))
    with pytest.raises(ConfigError, match=r"promotion\.drift\.alpha: "):
        PipelineConfig.from_dict(_cfg(alpha=0))
    with pytest.raises(ConfigError, match=r"promotion\.drift\.max_oov: Extra inputs"):
        PipelineConfig.from_dict(_cfg(max_oov=0.1))


# ---- the profile artifact --------------------------------------------------------------------


def test_reference_profile_from_a_run_and_none_without_one(mlflow_store):
    from pipelines.drift_step import PROFILE_ARTIFACT, reference_profile

    prof = profile_data(["some text here"], ["x"])
    with mlflow.start_run() as with_profile:
        mlflow.log_dict(prof.to_dict(), PROFILE_ARTIFACT)
    with mlflow.start_run() as without:
        mlflow.log_dict({"other": 1}, "data/other.json")
    with mlflow.start_run() as broken:
        mlflow.log_dict({"schema": 99}, PROFILE_ARTIFACT)
    assert reference_profile(with_profile.info.run_id) == prof
    assert reference_profile(without.info.run_id) is None
    assert reference_profile(broken.info.run_id) is None
    assert reference_profile(None) is None


# ---- two real pipeline runs ------------------------------------------------------------------


def _permissive_suite(folder: Path) -> Path:
    """The shipped sentiment suite without its class-balance bounds, so a skewed set passes the
    gate and reaches the drift check (which is what this test is about)."""
    spec = json.loads((REPO / "validation" / "suites" / "sentiment.json").read_text())
    spec["name"] = "sentiment-any-balance"
    spec["expectations"] = [e for e in spec["expectations"]
                            if e["type"] != "expect_column_values_to_not_be_in_set"]
    path = folder / "suite.json"
    path.write_text(json.dumps(spec))
    return path


def _shifted_data(folder: Path) -> Path:
    """Another kind of text (full test-set sentences, not the training phrases) with the negative
    class mostly removed: 135 positive, 15 negative."""
    df = pd.read_csv(SST2 / "test.tsv", sep="\t", quoting=3)
    df = pd.concat([df[df.label == 1].head(135), df[df.label == 0].head(15)])
    path = folder / "shifted.tsv"
    df.sample(frac=1, random_state=0).to_csv(path, sep="\t", index=False, quoting=3)
    return path


def _run(folder: Path, checkpoint: Path, **overrides):
    from pipelines.run import run_pipeline

    folder.mkdir(exist_ok=True)
    pipe = write_pipeline(folder, checkpoint, tuning__n_trials=1, tuning__max_epochs=1,
                          data__max_rows=200, **overrides)
    return run_pipeline(PipelineConfig.load(pipe), build=False)


def _metric_gate_alone(run_id: str) -> Decision:
    m = MlflowClient().get_run(run_id).data.metrics
    return should_promote({"accuracy": m["test_accuracy"]},
                          {"accuracy": m["champion_test_accuracy"]}, "accuracy", 0.0)


@pytest.mark.slow
def test_shifted_run_records_drift_and_block_mode_keeps_the_champion(mlflow_store, tmp_path,
                                                                     tiny_checkpoint):
    client = MlflowClient()
    suite = str(_permissive_suite(tmp_path))
    first = _run(tmp_path / "balanced", tiny_checkpoint, validation__suite=suite)
    assert first.promoted and first.model_version == "1"
    blob = json.dumps(mlflow.artifacts.load_dict(f"runs:/{first.run_id}/data/profile.json"))
    train = pd.read_csv(SST2 / "train_sample.tsv", sep="\t", quoting=3, nrows=200)
    words = {w for t in train.sentence for w in re.findall(r"[a-z]{4,}", t.lower())}
    assert len(words) > 300 and not [w for w in words if w in blob]  # hashes, no raw words
    v1 = client.get_model_version("tiny-sentiment", "1")
    assert "maas.drift.status" not in v1.tags  # nothing to compare the first champion with

    shifted = str(_shifted_data(tmp_path))
    blocked = _run(tmp_path / "block", tiny_checkpoint, validation__suite=suite,
                   data__path=shifted, promotion__drift={"mode": "block"})
    assert blocked.model_version == "2" and not blocked.promoted
    assert _metric_gate_alone(blocked.run_id).promote, "the metric gate alone would promote"
    assert str(client.get_model_version_by_alias("tiny-sentiment", "champion").version) == "1"
    v2 = client.get_model_version("tiny-sentiment", "2").tags
    assert v2["maas.drift.status"] == "drift" and v2["maas.drift.mode"] == "block"
    assert {"label_tvd", "length_ks"} <= set(v2["maas.drift.breached"].split(","))
    assert float(v2["maas.drift.label_tvd"]) > 0.2 and float(v2["maas.drift.length_ks"]) > 0.2
    assert v2["maas.drift.reference_version"] == "1"
    assert v2["maas.drift.reference_run_id"] == first.run_id
    for name in ("oov_increase", "pred_label_tvd", "disagreement"):
        assert 0 <= abs(float(v2[f"maas.drift.{name}"])) <= 1
    assert v2["maas.decision.promote"] == "false"
    assert v2["maas.decision.reason"].startswith("reject: drift blocks promotion (drift in ")
    assert "drift blocks promotion" in blocked.decision_reason
    report = mlflow.artifacts.load_dict(f"runs:/{blocked.run_id}/promotion/drift.json")
    assert report["status"] == "drift" and report["reference_version"] == "1"
    assert [f["name"] for f in report["figures"]] == list(FIGURES)

    warned = _run(tmp_path / "warn", tiny_checkpoint, validation__suite=suite,
                  data__path=shifted, promotion__drift={"mode": "warn"})
    v3 = client.get_model_version("tiny-sentiment", warned.model_version).tags
    assert v3["maas.drift.status"] == "drift" and v3["maas.drift.mode"] == "warn"
    assert "drift warning (mode warn, not blocking)" in v3["maas.decision.reason"]
    alone = _metric_gate_alone(warned.run_id)
    assert warned.promoted is alone.promote  # decided on the metrics alone
    champion = client.get_model_version_by_alias("tiny-sentiment", "champion").version
    assert str(champion) == (warned.model_version if alone.promote else "1")
