"""The GX Core 1.x validation gate, on real Great Expectations (no mocks) and the repo's SST-2
slice.

Each defect is injected into a copy of the real slice and must fail exactly the expectation that
guards it, named in ``summary()`` with the offending rows as examples."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from helpers import DEFECTS, REPO, SST2_TRAIN, duplicate_30pct, set_values

from validation import ExpectationOutcome, ValidationReport, resolve_suite, validate
from validation.gate import SUITES_DIR, SuiteError


@pytest.fixture(scope="module")
def sst2() -> pd.DataFrame:
    df = pd.read_csv(SST2_TRAIN, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False)
    return df.rename(columns={"sentence": "text"})[["text", "label"]]


@pytest.fixture(scope="module")
def clean_report(sst2, tmp_path_factory) -> tuple[ValidationReport, Path]:
    docs = tmp_path_factory.mktemp("gx") / "data_docs"
    return validate(sst2, suite="sentiment", docs_dir=docs), docs


def test_importing_validation_does_not_import_gx():
    code = "import sys, validation; sys.exit('great_expectations' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False).returncode == 0


def test_real_sst2_slice_passes(clean_report, sst2):
    report, _ = clean_report
    assert sst2.label.dtype.kind == "i" and set(sst2.label) == {0, 1}
    assert report.success is True and report.failed == []
    assert report.suite_name == "sentiment"
    spec = json.loads((SUITES_DIR / "sentiment.json").read_text())
    assert report.suite_version == spec["meta"]["version"]
    # every suite entry is evaluated, in the suite's order (two same-type checks on `label` kept)
    assert ([o.expectation_type for o in report.outcomes]
            == [e["type"] for e in spec["expectations"]])
    assert all(isinstance(o, ExpectationOutcome) and o.success for o in report.outcomes)
    assert report.statistics["rows"] == len(sst2) == 2000
    assert report.statistics["evaluated_expectations"] == len(spec["expectations"])
    assert report.summary().startswith("validation PASSED: suite 'sentiment' v")


def test_data_docs_written_to_docs_dir(clean_report):
    report, docs = clean_report
    assert report.docs_dir == docs.resolve()
    index = docs / "index.html"
    assert index.is_file() and "sentiment" in index.read_text()
    assert list((docs / "validations").rglob("*.html")), "validation result page"
    assert list((docs / "expectations").rglob("*.html")), "suite page"
    assert str(index) in report.summary()


def test_no_docs_without_docs_dir(sst2):
    assert validate(sst2).docs_dir is None


@pytest.mark.parametrize("name", list(DEFECTS))
def test_defect_fails_the_right_expectation(sst2, name):
    mutate, etype, column, kwargs, example = DEFECTS[name]
    report = validate(mutate(sst2), suite="sentiment")
    assert report.success is False
    failed = report.failed
    assert [(o.expectation_type, o.column) for o in failed] == [(etype, column)], report.summary()
    outcome = failed[0]
    assert kwargs.items() <= outcome.kwargs.items()
    text = report.summary()
    assert text.startswith("validation FAILED") and etype in text
    assert (f"column {column!r}" if column else "(table") in text
    if example is not None:
        row, value = example
        assert outcome.examples and outcome.examples[0]["row"] == row
        if value is not None or name != "over_long_text":
            assert outcome.examples[0]["value"] == value
        assert f"row {row}: " in text
        assert outcome.unexpected_count >= 1


def test_failure_details(sst2):
    report = validate(set_values([5], "label", 7)(sst2))
    (o,) = report.failed
    assert o.examples == [{"row": 5, "value": 7}]
    assert o.unexpected_count == 1 and o.element_count == 2000
    assert "row 5: 7" in report.summary() and "why: binary task" in report.summary()

    few = validate(sst2.iloc[:60])
    assert few.failed[0].observed == 60 and "observed 60" in few.summary()

    dup = validate(duplicate_30pct(sst2)).failed[0]
    assert dup.observed == pytest.approx(0.7, abs=0.01)

    long = validate(set_values([11], "text", "so " * 500)(sst2))
    assert "(1500 chars)" in long.failed[0].examples[0]["value"]
    assert len(long.summary()) < 2000, "long values are clipped in the summary"


def test_string_labels_fail_with_a_hint(sst2):
    report = validate(sst2.assign(label=sst2.label.astype(str)))
    assert [o.expectation_type for o in report.failed] == ["expect_column_values_to_be_in_set"]
    assert "values are strings" in report.summary()


def test_missing_column_is_a_failed_outcome_not_a_crash(sst2):
    report = validate(sst2[["text"]])
    assert not report.success
    assert {o.column for o in report.failed} == {"label"}
    assert all(o.error and "label" in o.error for o in report.failed)


def test_to_dict_is_strict_json(sst2):
    report = validate(set_values([8], "text", None)(set_values([5], "label", 7)(sst2)))
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert d["suite"] == "sentiment" and d["version"] == report.suite_version
    assert d["success"] is False
    assert d["statistics"]["unsuccessful_expectations"] == 2
    assert {"expect_column_values_to_not_be_null", "expect_column_values_to_be_in_set"} == set(
        d["failed"])
    assert len(d["outcomes"]) == len(report.outcomes)
    null = next(o for o in d["outcomes"] if o["expectation_type"].endswith("not_be_null")
                and o["column"] == "text")
    assert null["examples"] == [{"row": 8, "value": None}]


def test_validate_is_quiet(sst2, capfd):
    validate(sst2.iloc[:150])
    out, err = capfd.readouterr()
    assert out == "" and err == "", "GX progress bars / logs leaked"


def test_resolve_suite_by_name_and_path(tmp_path):
    assert resolve_suite("sentiment") == SUITES_DIR / "sentiment.json"
    copy = tmp_path / "mine.json"
    copy.write_text((SUITES_DIR / "sentiment.json").read_text())
    assert resolve_suite(copy) == copy.resolve()
    assert resolve_suite(str(copy)) == copy.resolve()


@pytest.mark.parametrize("bad", ["nope", "sentimnt", "missing/suite.json"])
def test_unknown_suite_names_the_available_ones(bad, sst2):
    with pytest.raises(ValueError, match="available suites.*sentiment"):
        resolve_suite(bad)
    with pytest.raises(FileNotFoundError):
        validate(sst2, suite=bad)


def _write_suite(tmp_path, mutate) -> Path:
    spec = json.loads((SUITES_DIR / "sentiment.json").read_text())
    mutate(spec)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize("mutate, match", [
    (lambda s: s["expectations"].append({"type": "expect_column_values_to_be_postive",
                                         "kwargs": {"column": "label"}}),
     r"#8 \(expect_column_values_to_be_postive\): unknown expectation type"),
    (lambda s: s["expectations"][1]["kwargs"].pop("column"),
     r"#1 \(expect_column_values_to_not_be_null\): invalid kwargs .*column"),
    (lambda s: s["expectations"][3]["kwargs"].pop("value_set"),
     r"#3 \(expect_column_values_to_be_in_set\): invalid kwargs .*value_set"),
    (lambda s: s["expectations"].append(dict(s["expectations"][0])),
     r"#8 \(expect_table_row_count_to_be_between\): duplicate of expectation #0"),
    (lambda s: s["expectations"].append({"kwargs": {}}), r"#8: missing 'type'"),
    (lambda s: s.pop("expectations"), r"'expectations' must be a non-empty list"),
], ids=["unknown_type", "missing_column", "missing_value_set", "duplicate", "no_type",
        "no_expectations"])
def test_malformed_suite_names_the_expectation(tmp_path, sst2, mutate, match):
    path = _write_suite(tmp_path, mutate)
    with pytest.raises(SuiteError, match=match):
        validate(sst2, suite=path)


def test_invalid_json_suite(tmp_path, sst2):
    path = tmp_path / "broken.json"
    path.write_text('{"name": "x", "expectations": [')
    with pytest.raises(SuiteError, match="not valid JSON"):
        validate(sst2, suite=path)
