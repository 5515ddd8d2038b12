"""Suite bootstrap: ``draft_suite`` (pure) and ``maas suite init`` on real GX and new data sets.

Two new data sets are written in tmp_path: 4 string classes, headerless, text first; and a binary
set with the label first and a 13% minority class. The drafted suite must pass on the data it was
drafted from and reject a 95/5 collapse, empty texts, an unknown label and a vanished class; on
the repo's SST-2 slice it must reject every defect today's suite tests inject."""

from __future__ import annotations

import csv
import datetime as dt
import json
import random
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from helpers import DEFECTS, SST2_TRAIN, maas

from pipelines.cli import main
from pipelines.config import PipelineConfig
from pipelines.data import load_data
from validation import ProfileError, draft_suite, load_suite_spec, validate

TOPICS = {
    "sports": "match goal team coach league season striker keeper derby final",
    "politics": "vote senate minister election party bill debate cabinet poll law",
    "tech": "chip software cloud startup laptop browser robot code server app",
    "food": "recipe bake spicy dinner kitchen chef soup dessert flavour grill",
}
FILLER = ["the", "a", "today", "new", "big", "small", "report", "says", "after", "before",
          "over", "with"]


def texts_for(label: str, n: int, rng: random.Random, seen: set[str]) -> list[str]:
    words = TOPICS.get(label, TOPICS["tech"]).split()
    out: list[str] = []
    while len(out) < n:
        t = " ".join(rng.choice(words if rng.random() < 0.6 else FILLER)
                     for _ in range(rng.randint(4, 14)))
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def write_rows(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    return path


def four_class_rows(seed: int = 0, per_class: int = 60) -> list[tuple[str, str]]:
    """(text, label): 4 string classes in shuffled order, texts unique."""
    rng, seen = random.Random(seed), set()
    rows = [(t, c) for c in TOPICS for t in texts_for(c, per_class, rng, seen)]
    rng.shuffle(rows)
    return rows


def minority_rows(seed: int = 1, n: int = 300, minority: float = 0.13) -> list[tuple[str, str]]:
    """(label, text): binary 'ok' / 'fraud' with a 13% 'fraud' class, label first."""
    rng, seen = random.Random(seed), set()
    k = round(n * minority)
    rows = ([("fraud", t) for t in texts_for("politics", k, rng, seen)]
            + [("ok", t) for t in texts_for("food", n - k, rng, seen)])
    rng.shuffle(rows)
    return rows


def write_pipeline_file(folder: Path, data: dict, suite: str | None,
                        checkpoint: Path | None = None, name: str = "news") -> Path:
    cfg = {
        "name": name,
        "data": {**data, "split": {"validation": 0.25, "test": 0.25, "seed": 1}},
        "model": {"family": "text_classifier", "max_length": 32,
                  **({"checkpoint": str(checkpoint)} if checkpoint else {})},
        "tuning": {"n_trials": 1, "max_epochs": 1, "sampler_seed": 7,
                   "search_space": {"learning_rate": {"type": "float", "low": 1e-4,
                                                      "high": 1e-3, "log": True}},
                   "fixed": {"batch_size": 32}},
        "registry": {"model_name": f"{name}-model"},
        "bento": {"enabled": False},
        "compression": {"enabled": False},
    }
    if suite is not None:
        cfg["validation"] = {"suite": suite}
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture
def news(tmp_path) -> Path:
    """4 string classes, headerless CSV, text first; the suite path named but not there yet."""
    folder = tmp_path / "news"
    folder.mkdir()
    write_rows(folder / "news.csv", four_class_rows())
    return write_pipeline_file(folder, {"path": "news.csv", "format": "csv", "header": False,
                                        "text_column": 0, "label_column": 1},
                               suite="suites/news.json")


@pytest.fixture
def fraud(tmp_path) -> Path:
    """Binary, headerless CSV, label first, 13% minority class; no validation section."""
    folder = tmp_path / "fraud"
    folder.mkdir()
    write_rows(folder / "fraud.csv", minority_rows())
    return write_pipeline_file(folder, {"path": "fraud.csv", "format": "csv", "header": False,
                                        "text_column": 1, "label_column": 0},
                               suite=None, name="fraud")


def frame_of(pipeline: Path) -> pd.DataFrame:
    return load_data(PipelineConfig.load(pipeline).data).all_rows[["text", "label"]]


def failed(df: pd.DataFrame, suite: Path) -> list[tuple[str, object]]:
    report = validate(df, suite)
    return [(o.expectation_type, o.kwargs.get("value_set")) for o in report.failed]


# --------------------------------------------------------------------------------------------
# draft_suite: pure


def test_draft_keeps_label_types_and_explains_every_entry():
    df = pd.DataFrame({"text": [f"text number {i}" for i in range(200)],
                       "label": ["b"] * 120 + ["a"] * 80})
    day = dt.date(2026, 1, 2)
    spec = draft_suite(df, "demo", drafted_on=day)
    assert spec == draft_suite(df, "demo", drafted_on=day), "deterministic"
    meta = spec["meta"]
    assert meta["rows_profiled"] == 200 and len(meta["data_sha256"]) == 64
    assert meta["version"] == f"1.0.0-draft.20260102.{meta['data_sha256'][:12]}"
    assert all(e["meta"]["why"] and isinstance(e["meta"]["observed"], dict)
               for e in spec["expectations"])
    label_set = next(e for e in spec["expectations"]
                     if e["type"] == "expect_column_values_to_be_in_set"
                     and "mostly" not in e["kwargs"])
    assert label_set["kwargs"]["value_set"] == ["a", "b"]

    ints = draft_suite(df.assign(label=[1] * 120 + [0] * 80), "demo", fingerprint="f" * 64)
    sets = [e["kwargs"]["value_set"] for e in ints["expectations"] if "value_set" in e["kwargs"]]
    assert all(type(v) is int for s in sets for v in s), sets
    assert ints["meta"]["data_sha256"] == "f" * 64
    assert ints["meta"]["data_sha256"] != spec["meta"]["data_sha256"]


def shares(spec: dict) -> dict[tuple[str, object], float]:
    return {("not" if "_not_" in e["type"] else "be", e["kwargs"]["value_set"][0]):
            e["kwargs"]["mostly"]
            for e in spec["expectations"]
            if e["type"].endswith("be_in_set") and "mostly" in e["kwargs"]}


@pytest.mark.parametrize("counts, tol, expected", [
    # be_in_set mostly = lower share bound; not_be_in_set mostly = 1 - upper share bound
    ({"x": 87, "y": 13}, 0.5, {("be", "y"): 0.065, ("be", "x"): 0.435,
                               ("not", "y"): 0.805}),  # x: upper bound 130% -> omitted
    ({"x": 50, "y": 50}, 0.5, {("be", "x"): 0.25, ("be", "y"): 0.25, ("not", "x"): 0.25,
                               ("not", "y"): 0.25}),
    ({"x": 50, "y": 50}, 0.2, {("be", "x"): 0.4, ("be", "y"): 0.4, ("not", "x"): 0.4,
                               ("not", "y"): 0.4}),
    ({"x": 25, "y": 25, "z": 50}, 0.5, {("be", "x"): 0.125, ("be", "y"): 0.125,
                                        ("be", "z"): 0.25, ("not", "x"): 0.625,
                                        ("not", "y"): 0.625, ("not", "z"): 0.25}),
])
def test_class_share_bounds(counts, tol, expected):
    labels = [c for c, k in counts.items() for _ in range(k)]
    df = pd.DataFrame({"text": [f"t{i}" for i in range(len(labels))], "label": labels})
    assert shares(draft_suite(df, "s", share_tolerance=tol)) == pytest.approx(expected)


def by_type(spec: dict, etype: str) -> list[dict]:
    return [e["kwargs"] for e in spec["expectations"] if e["type"] == etype]


def test_lengths_duplicates_rows_and_nulls():
    texts = ["x" * (10 + i % 91) for i in range(400)]  # lengths 10..100, each one 4-5 times
    df = pd.DataFrame({"text": texts, "label": [i % 2 for i in range(400)]})
    spec = draft_suite(df, "s")
    hard, bulk = by_type(spec, "expect_column_value_lengths_to_be_between")
    assert hard == {"column": "text", "min_value": 1, "max_value": 150}
    # bulk: [floor(q01 10 x 0.5), ceil(q99 99.x x 1.5)] for 95% of the texts
    assert bulk["min_value"] == 5 and bulk["max_value"] == 149 and bulk["mostly"] == 0.95
    (dup,) = by_type(spec, "expect_column_proportion_of_unique_values_to_be_between")
    assert dup["min_value"] == 0.0  # 91 distinct of 400: duplicates 77%, allowed 2 x 77%
    assert by_type(spec, "expect_table_row_count_to_be_between") == [{"min_value": 100}]

    uniq = draft_suite(df.assign(text=[f"text {i}" for i in range(400)]), "s")
    (dup,) = by_type(uniq, "expect_column_proportion_of_unique_values_to_be_between")
    assert dup["min_value"] == 0.95
    big = pd.concat([df] * 5, ignore_index=True)
    assert by_type(draft_suite(big, "s"), "expect_table_row_count_to_be_between") == [
        {"min_value": 200}]
    assert by_type(draft_suite(df.iloc[:40], "s"), "expect_table_row_count_to_be_between") == [
        {"min_value": 40}]

    nulls = df.astype(object)
    nulls.loc[:3, "text"] = None
    text_null, label_null = by_type(draft_suite(nulls, "s"),
                                    "expect_column_values_to_not_be_null")
    assert text_null == {"column": "text", "mostly": 0.99} and label_null == {"column": "label"}


@pytest.mark.parametrize("df, match", [
    (pd.DataFrame({"text": ["a", "b"], "label": [1, 1]}), r"'label' has 1 class"),
    (pd.DataFrame({"text": ["a", "b"]}), r"missing column\(s\) \['label'\]"),
    (pd.DataFrame({"text": [None, None], "label": [0, 1]}), r"'text' has no non-null"),
])
def test_unusable_sample_is_refused(df, match):
    with pytest.raises(ProfileError, match=match):
        draft_suite(df, "s")


# --------------------------------------------------------------------------------------------
# the drafted suite on real GX


def test_sst2_draft_passes_and_rejects_todays_injected_defects(tmp_path):
    df = pd.read_csv(SST2_TRAIN, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False)
    df = df.rename(columns={"sentence": "text"})[["text", "label"]]
    path = tmp_path / "sst2.json"
    path.write_text(json.dumps(draft_suite(df, "sst2-draft")))
    assert load_suite_spec(path)["name"] == "sst2-draft"
    assert validate(df, path).success
    for name, (mutate, etype, column, _kwargs, _example) in DEFECTS.items():
        report = validate(mutate(df), path)
        assert not report.success, name
        assert (etype, column) in [(o.expectation_type, o.column) for o in report.failed], name


def test_cli_init_on_four_string_classes_then_gate(news, tmp_path):
    res = maas("suite", "init", news)
    suite = news.parent / "suites" / "news.json"
    assert res.exit_code == 0, res.output
    assert f"to {suite}" in res.output and "validation PASSED" in res.output
    assert "still uses" not in res.output
    spec = json.loads(suite.read_text())
    assert spec["name"] == "news" and spec["meta"]["rows_profiled"] == 240
    assert spec["meta"]["data_sha256"] == load_data(PipelineConfig.load(news).data).fingerprint
    assert by_type(spec, "expect_column_values_to_be_in_set")[0]["value_set"] == sorted(TOPICS)

    res = maas("validate", news)
    assert res.exit_code == 0 and "validation PASSED" in res.output, res.output

    df = frame_of(news)
    collapse = df.assign(label=["sports"] * 228 + ["tech"] * 12)  # 95/5
    bad = failed(collapse, suite)
    assert ("expect_column_distinct_values_to_contain_set", sorted(TOPICS)) in bad
    assert ("expect_column_values_to_not_be_in_set", ["sports"]) in bad
    assert ("expect_column_values_to_be_in_set", ["tech"]) in bad
    empty = df.copy()
    empty.loc[[4, 9], "text"] = ""
    assert failed(empty, suite) == [("expect_column_value_lengths_to_be_between", None)]

    rows = four_class_rows()
    rows[7] = (rows[7][0], "weather")  # an unknown label, through the CLI gate
    write_rows(news.parent / "news.csv", rows)
    res = maas("validate", news)
    assert res.exit_code == 3, res.output
    assert "expect_column_values_to_be_in_set" in res.output and "row 7: 'weather'" in res.output


def test_cli_init_label_first_with_13pct_minority(fraud):
    out = fraud.parent / "gate" / "fraud-draft.json"
    res = maas("suite", "init", fraud, "--out", out, "--name", "fraud-v1")
    assert res.exit_code == 0, res.output
    assert "validation PASSED" in res.output  # the 13% class is fine
    assert "still uses suite 'sentiment'" in res.output and "suite: gate/fraud-draft.json" in (
        res.output)
    spec = json.loads(out.read_text())
    assert spec["name"] == "fraud-v1"
    assert shares(spec) == {("be", "fraud"): 0.065, ("be", "ok"): 0.435, ("not", "fraud"): 0.805}

    df = frame_of(fraud)
    assert (df.label == "fraud").mean() == pytest.approx(0.13)
    n = len(df)
    collapse = df.assign(label=["ok"] * (n - n // 20) + ["fraud"] * (n // 20))  # 95/5
    assert failed(collapse, out) == [("expect_column_values_to_be_in_set", ["fraud"])]
    vanished = df[df.label == "ok"]
    assert ("expect_column_distinct_values_to_contain_set", ["fraud", "ok"]) in failed(vanished,
                                                                                       out)
    assert validate(df.assign(label=df.label.replace({"fraud": "Fraud"})), out).success is False


def test_refuses_to_overwrite_without_force(news):
    suite = news.parent / "suites" / "news.json"
    suite.parent.mkdir()
    suite.write_text("{}")
    res = maas("suite", "init", news)
    assert res.exit_code == 2 and str(suite) in res.output and "--force" in res.output
    assert suite.read_text() == "{}"
    res = maas("suite", "init", news, "--force")
    assert res.exit_code == 0, res.output
    assert json.loads(suite.read_text())["name"] == "news"


def test_default_out_beside_the_pipeline_for_a_shipped_suite_name(fraud):
    res = maas("suite", "init", fraud, "--share-tolerance", "0.3")
    out = fraud.parent / "fraud.suite.json"
    assert res.exit_code == 0, res.output
    spec = json.loads(out.read_text())
    assert spec["name"] == "fraud" and spec["meta"]["draft_settings"]["share_tolerance"] == 0.3
    assert shares(spec)[("be", "fraud")] == 0.091
    assert "suite: fraud.suite.json" in res.output


def test_unusable_data_exits_3(fraud):
    write_rows(fraud.parent / "fraud.csv", [("ok", f"text {i}") for i in range(50)])
    res = maas("suite", "init", fraud)
    assert res.exit_code == 3 and "'label' has 1 class" in res.output, res.output
    assert not (fraud.parent / "fraud.suite.json").exists()


def test_pii_flag(news):
    res = maas("suite", "init", news, "--pii")
    try:
        from validation.pii import pii_expectations
    except ImportError:
        assert res.exit_code == 2 and "--pii" in res.output and "validation.pii" in res.output
        assert not (news.parent / "suites" / "news.json").exists()
        return
    assert res.exit_code == 0, res.output
    spec = json.loads((news.parent / "suites" / "news.json").read_text())
    entries = pii_expectations(column="text", mostly=1.0)
    assert entries and spec["expectations"][-len(entries):] == json.loads(json.dumps(entries))


def test_pii_in_the_sample_fails_the_drafts_own_check(news):
    pytest.importorskip("validation.pii")
    rows = four_class_rows()
    rows[3] = ("write to jane.doe@example.com for the final", rows[3][1])
    write_rows(news.parent / "news.csv", rows)
    res = maas("suite", "init", news, "--pii")
    assert res.exit_code == 3, res.output
    assert "fails on the data it was drafted from" in res.output and "row 3" in res.output
    assert (news.parent / "suites" / "news.json").is_file(), "kept for editing"


# --------------------------------------------------------------------------------------------
# config: validation.suite paths resolve against the pipeline file


def test_suite_paths_resolve_against_the_pipeline_file(news, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here, tmp = news.parent.resolve(), tmp_path.resolve()
    cfg = PipelineConfig.load(news)
    assert cfg.validation.suite == str(here / "suites" / "news.json")
    assert cfg.validation.suite_path == here / "suites" / "news.json"
    for value, expected in [("sentiment", "sentiment"), ("gate.json", str(here / "gate.json")),
                            (str(tmp / "abs.json"), str(tmp / "abs.json")),
                            ("../up/x.json", str(tmp / "up" / "x.json"))]:
        got = PipelineConfig.load(news, {"validation.suite": value}).validation
        assert got.suite == expected, value
    shipped = PipelineConfig.load(news, {"validation.suite": "sentiment"}).validation
    assert shipped.suite_path is None


# --------------------------------------------------------------------------------------------
# the real pipeline with the drafted suite


@pytest.fixture(scope="module")
def tiny_base(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny BERT without its 2-label head: a base checkpoint, as the shipped MiniLM is, so
    a 4-class head is initialised fresh."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    out = tmp_path_factory.mktemp("tiny-base")
    BertForSequenceClassification.from_pretrained(tiny_checkpoint).bert.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_checkpoint).save_pretrained(out)
    return out


@pytest.mark.slow
def test_maas_run_with_the_drafted_suite(mlflow_store, tmp_path, tiny_base):
    folder = tmp_path / "run"
    folder.mkdir()
    # 4 string classes, label first, headerless; the suite named in the file does not exist yet
    write_rows(folder / "news.csv", [(c, t) for t, c in four_class_rows(per_class=40)])
    pipe = write_pipeline_file(folder, {"path": "news.csv", "format": "csv", "header": False,
                                        "text_column": 1, "label_column": 0},
                               suite="news-suite.json", checkpoint=tiny_base)
    assert maas("suite", "init", pipe).exit_code == 0
    res = CliRunner().invoke(main, ["run", str(pipe), "--no-build"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "validation: passed" in res.output and "registered        news-model version 1" in (
        res.output)
    import mlflow

    run = mlflow.search_runs(experiment_names=["news"], filter_string="tags.`maas.role` = "
                             "'pipeline'", output_format="list")[0]
    assert run.data.tags["maas.suite"] == "news-suite"
    assert run.data.params["validation.suite"] == str((folder / "news-suite.json").resolve())
