"""Privacy: PII expectations, the text redactor, ``privacy.log_text`` in the config, the gate and
a whole pipeline run. The canary tests plant a unique string in the data and search every byte
of the MLflow database and artifact tree (and everything else the run wrote) for it."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from helpers import SST2, write_pipeline

from pipelines.cli import main
from pipelines.config import ConfigError, PipelineConfig
from validation import loggable_texts, pii_expectations, redact_text, scrub, validate
from validation.gate import SUITES_DIR
from validation.pii import PLACEHOLDER_TEXT, WITHHELD, iban_valid, luhn_valid

CANARY = "CANARY-7f3a9c"
EMAIL = "jane.canary.doe@example.org"

# ---------------------------------------------------------------------------------------------
# redact_text and the expectations' regexes: true positives and near-misses

REDACT_CASES = {
    # name: (text, redacted text)
    "email": ("write to john.doe+x@mail.example.co.uk!", "write to [EMAIL]!"),
    "phone_intl": ("call +44 20 7946 0958 today", "call [PHONE] today"),
    "phone_e164": ("sms +14155552671", "sms [PHONE]"),
    "phone_us_parens": ("(555) 123-4567 is mine", "[PHONE] is mine"),
    "phone_us_dots": ("555.123.4567", "[PHONE]"),
    "card_visa_spaces": ("card 4111 1111 1111 1111 ok", "card [CARD] ok"),
    "card_mc_plain": ("5555555555554444", "[CARD]"),
    "card_amex": ("amex 3782-822463-10005", "amex [CARD]"),
    "iban_de_groups": ("IBAN DE89 3704 0044 0532 0130 00.", "IBAN [IBAN]."),
    "iban_gb_plain": ("to GB82WEST12345698765432", "to [IBAN]"),
    "two_kinds": ("a@b.io or 555-123-4567", "[EMAIL] or [PHONE]"),
    # near-misses: unchanged
    "card_16_not_luhn": ("ref 4111 1111 1111 1112", "ref 4111 1111 1111 1112"),
    "card_16_not_luhn_plain": ("4111111111111112", "4111111111111112"),
    "order_number": ("Order #12345678 shipped", "Order #12345678 shipped"),
    "date_iso": ("seen on 2024-01-15 at 10:30", "seen on 2024-01-15 at 10:30"),
    "date_dots": ("15.01.2024", "15.01.2024"),
    "iban_bad_checksum": ("GB82WEST12345698765433", "GB82WEST12345698765433"),
    "product_code": ("ISO9001 part AB12CDEF", "ISO9001 part AB12CDEF"),
    "rating": ("a 9.5/10 movie, 100 200 minutes", "a 9.5/10 movie, 100 200 minutes"),
    "at_sign": ("meet @ noon, @handle", "meet @ noon, @handle"),
    "empty": ("", ""),
}


@pytest.mark.parametrize("text,expected", REDACT_CASES.values(), ids=REDACT_CASES.keys())
def test_redact_text(text, expected):
    assert redact_text(text) == expected


@pytest.mark.parametrize("digits,ok", [("4111111111111111", True), ("4111111111111112", False),
                                       ("79927398713", True), ("79927398710", False),
                                       ("0", False)])
def test_luhn(digits, ok):
    assert luhn_valid(digits) is ok


@pytest.mark.parametrize("iban,ok", [("DE89 3704 0044 0532 0130 00", True),
                                     ("DE89 3704 0044 0532 0130 01", False),
                                     ("GB82WEST12345698765432", True), ("XX00", False)])
def test_iban_checksum(iban, ok):
    assert iban_valid(iban) is ok


def test_log_text_modes_for_lists_and_values():
    texts = ["mail a@b.io", f"plain {CANARY}"]
    assert loggable_texts(texts, "full") == texts
    assert loggable_texts(texts, "redacted") == ["mail [EMAIL]", f"plain {CANARY}"]
    assert loggable_texts(texts, "none", n=1) == [PLACEHOLDER_TEXT]
    value = {"observed_value": ["x@y.io"], "unexpected_count": 3, "index": [4, 5], "ok": True}
    assert scrub(value, "none") == {"observed_value": [WITHHELD], "unexpected_count": 3,
                                    "index": [4, 5], "ok": True}
    assert scrub(value, "redacted")["observed_value"] == ["[EMAIL]"]
    with pytest.raises(ValueError, match="log_text mode"):
        scrub(value, "partial")


def test_pii_expectations_shape():
    entries = pii_expectations("review", mostly=0.95)
    assert [e["meta"]["pii"] for e in entries] == ["email", "iban", "card", "phone"]
    for e in entries:
        assert e["type"] == "expect_column_values_to_not_match_regex"
        assert e["kwargs"]["column"] == "review" and e["kwargs"]["mostly"] == 0.95
        assert e["meta"]["why"].startswith("PII")
    assert "mostly" not in pii_expectations()[0]["kwargs"]  # 1.0: GX's default
    with pytest.raises(ValueError, match="mostly"):
        pii_expectations(mostly=1.5)


# rows the GX suite must flag (by kind) and rows it must let through
GX_ROWS = [
    ("write to john.doe@mail.example.com", "email"),
    ("call me on +44 20 7946 0958", "phone"),
    ("ring (555) 123-4567 after six", "phone"),
    ("pay with 4111 1111 1111 1111", "card"),
    ("IBAN DE89 3704 0044 0532 0130 00", "iban"),
    ("Order #12345678 arrived on 2024-01-15", None),
    ("released 15.01.2024, rated 9/10", None),
    ("a gripping film with a weak ending", None),
]


def _suite_file(folder: Path, mostly: float) -> Path:
    spec = json.loads((SUITES_DIR / "sentiment.json").read_text())
    spec["name"] = "sentiment-pii"
    spec["expectations"] = spec["expectations"] + pii_expectations("text", mostly=mostly)
    path = folder / "sentiment-pii.json"
    path.write_text(json.dumps(spec, indent=2))
    return path


def test_pii_expectations_run_in_the_gate(tmp_path):
    spec = {"name": "pii", "expectations": pii_expectations()}
    suite = tmp_path / "pii.json"
    suite.write_text(json.dumps(spec))
    df = pd.DataFrame({"text": [t for t, _ in GX_ROWS], "label": [0, 1] * 4})
    report = validate(df, suite)
    assert not report.success
    flagged: dict[str, set[int]] = {}
    for o, e in zip(report.outcomes, spec["expectations"], strict=True):
        flagged[e["meta"]["pii"]] = {x["row"] for x in o.examples}
    for row, (_, kind) in enumerate(GX_ROWS):
        hits = {k for k, rows in flagged.items() if row in rows}
        assert hits == ({kind} if kind else set()), (row, GX_ROWS[row][0], hits)


def _planted_frame() -> pd.DataFrame:
    rows = [{"text": f"a fine film number {i} {CANARY}" if i % 10 == 0 else
             f"a fine film number {i}", "label": i % 2} for i in range(120)]
    rows[3]["text"] = f"{CANARY} write to {EMAIL} please"
    rows[7]["text"] = f"{CANARY} or call 555-123-4567"
    return pd.DataFrame(rows)


@pytest.mark.parametrize("mode", ["full", "redacted", "none"])
def test_gate_report_and_data_docs_follow_the_mode(tmp_path, mode):
    suite = _suite_file(tmp_path, mostly=0.9)
    docs = tmp_path / "docs"
    report = validate(_planted_frame(), suite, docs_dir=docs, examples=mode)
    assert report.success  # 2 PII rows of 120 are within mostly=0.9
    failed_rows = [o for o in report.outcomes if o.unexpected_count and "regex" in
                   o.expectation_type]
    assert sum(o.unexpected_count for o in failed_rows) == 2  # counts survive every mode
    blob = json.dumps(report.to_dict()) + report.summary()
    files = b"".join(p.read_bytes() for p in docs.rglob("*") if p.is_file())
    assert (docs / "index.html").is_file()
    if mode == "full":
        assert CANARY in blob and EMAIL in blob
        assert CANARY.encode() in files and EMAIL.encode() in files
    elif mode == "redacted":
        assert CANARY in blob and EMAIL not in blob and "[EMAIL]" in blob
        assert CANARY.encode() in files and EMAIL.encode() not in files
    else:
        assert CANARY not in blob and EMAIL not in blob and WITHHELD in blob
        assert CANARY.encode() not in files and EMAIL.encode() not in files
        assert WITHHELD.encode() in files


def test_gate_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="examples must be one of"):
        validate(_planted_frame(), "sentiment", examples="some")


def test_privacy_config_field_paths(tmp_path, tiny_checkpoint):
    cfg = PipelineConfig.load(write_pipeline(tmp_path, tiny_checkpoint))
    assert cfg.privacy.log_text == "full"
    cfg = PipelineConfig.load(write_pipeline(tmp_path, tiny_checkpoint, privacy__log_text="none"))
    assert cfg.privacy.log_text == "none"
    with pytest.raises(ConfigError, match=r"privacy\.log_text: Input should be 'full'"):
        PipelineConfig.load(write_pipeline(tmp_path, tiny_checkpoint, privacy__log_text="hidden"))
    with pytest.raises(ConfigError, match=r"privacy\.logtext: Extra inputs"):
        PipelineConfig.load(write_pipeline(tmp_path, tiny_checkpoint, privacy__logtext="none"))


# ---------------------------------------------------------------------------------------------
# a whole pipeline run


def _planted_data(folder: Path) -> Path:
    """200 SST-2 rows; every 4th carries the canary (train, validation and test all get some);
    rows 1 and 2 also carry an e-mail address / a phone number: PII expectation failures within
    ``mostly``, so GX has unexpected values to show while the gate passes."""
    df = pd.read_csv(SST2 / "train_sample.tsv", sep="\t", quoting=3, nrows=200)
    df["sentence"] = [f"{t.strip()} {CANARY}" if i % 4 == 1 else t.strip()
                      for i, t in enumerate(df["sentence"])]
    df.loc[1, "sentence"] += f" mail {EMAIL}"
    df.loc[2, "sentence"] += f" {CANARY} call 555-123-4567"
    path = folder / "planted.tsv"
    df.to_csv(path, sep="\t", index=False, quoting=3)
    return path


def _run(tmp_path: Path, checkpoint: Path, mode: str, **extra) -> Path:
    inputs = tmp_path / "inputs"  # the only place the planted data may be; never searched
    inputs.mkdir()
    pipe = write_pipeline(inputs, checkpoint, data__path=str(_planted_data(inputs)),
                          data__max_rows=None, validation__suite=str(_suite_file(inputs, 0.95)),
                          tuning__n_trials=1, tuning__max_epochs=1, privacy__log_text=mode,
                          **extra)
    res = CliRunner().invoke(main, ["run", str(pipe), "--no-build"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return inputs


def _written_bytes(tmp_path: Path, inputs: Path) -> dict[Path, bytes]:
    """Every file the run wrote: the SQLite stores, the artifact tree, anything else."""
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("tiny")
    root = Path(exp.artifact_location.removeprefix("file://")).resolve()
    assert root.is_relative_to(tmp_path.resolve()), root  # so the walk below covers it
    files = {p: p.read_bytes() for p in tmp_path.rglob("*")
             if p.is_file() and not p.is_relative_to(inputs)}
    assert any(p.name == "mlflow.db" for p in files)
    assert any(p.is_relative_to(root) and p.name == "input_example.json" for p in files)
    assert any("data_docs" in p.parts for p in files)  # GX docs were logged
    return files


def _found(files: dict[Path, bytes], needle: str) -> list[str]:
    return sorted(str(p) for p, b in files.items() if needle.encode() in b)


@pytest.mark.slow
def test_log_text_none_leaves_no_canary_anywhere(mlflow_store, tmp_path, tiny_checkpoint):
    inputs = _run(tmp_path, tiny_checkpoint, "none",
                  compression__enabled=True, compression__variants=["onnx"],
                  compression__speed_rounds=1, compression__latency_samples=5)
    files = _written_bytes(tmp_path, inputs)
    assert _found(files, CANARY) == []
    assert _found(files, EMAIL) == [] and _found(files, "555-123-4567") == []
    assert _found(files, WITHHELD), "the GX unexpected values were withheld, not absent"
    assert _found(files, PLACEHOLDER_TEXT), "the model's input example is the placeholder"


@pytest.mark.slow
def test_log_text_full_logs_the_canary(mlflow_store, tmp_path, tiny_checkpoint):
    files = _written_bytes(tmp_path, _run(tmp_path, tiny_checkpoint, "full"))
    found = _found(files, CANARY)
    assert any("data_docs" in f for f in found) and any("result.json" in f for f in found)
    assert _found(files, EMAIL)


@pytest.mark.slow
def test_log_text_redacted_masks_pii(mlflow_store, tmp_path, tiny_checkpoint):
    files = _written_bytes(tmp_path, _run(tmp_path, tiny_checkpoint, "redacted"))
    assert _found(files, CANARY), "texts are logged (redacted, not withheld)"
    assert _found(files, EMAIL) == [] and _found(files, "555-123-4567") == []
    assert _found(files, "[EMAIL]") and _found(files, "[PHONE]")
