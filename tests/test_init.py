"""`maas init DATA`: the family, columns and labels detected from data it has never seen, a
pipeline file that loads, a drafted suite the data passes, and `maas run` of what it wrote;
ambiguous data gets a message naming the candidates and the flag that settles it."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import SST2, maas

from pipelines.config import PipelineConfig


def reviews(n: int = 120, seed: int = 0) -> pd.DataFrame:
    """SST-2 sentences under other column names, with an id and a free-text note column."""
    df = pd.read_csv(SST2 / "test.tsv", sep="\t", quoting=3).sample(n, random_state=seed)
    return pd.DataFrame({"review_id": range(1000, 1000 + n),
                         "opinion": np.where(df["label"] == 1, "good", "bad"),
                         "review body": df["sentence"].values})


def test_csv_with_its_own_column_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reviews().to_csv(tmp_path / "shop.csv", index=False)
    reviews(60, seed=1).to_csv(tmp_path / "shop_test.csv", index=False)
    res = maas("init", "shop.csv", "--test", "shop_test.csv")
    assert res.exit_code == 0, res.output
    assert "text column 'review body'" in res.output
    assert "label column 'opinion'" in res.output
    cfg = PipelineConfig.load(tmp_path / "shop.yaml")
    assert cfg.name == "shop" and cfg.registry.model_name == "shop"
    assert cfg.model.family == "text_classifier"
    assert (cfg.data.text_column, cfg.data.label_column) == ("review body", "opinion")
    assert cfg.data.test_path.resolve() == (tmp_path / "shop_test.csv").resolve()
    suite = json.loads((tmp_path / "shop.suite.json").read_text())
    label_sets = [e["kwargs"]["value_set"] for e in suite["expectations"]
                  if e["type"] == "expect_column_distinct_values_to_contain_set"
                  and e["kwargs"]["column"] == "label"]
    assert label_sets and set(label_sets[0]) == {"good", "bad"}
    assert "validation PASSED" in res.output
    assert "maas run shop.yaml" in res.output


def test_headerless_tsv_uses_positions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    df = reviews()
    df[["review body", "opinion"]].to_csv(tmp_path / "plain.txt", sep="\t", index=False,
                                          header=False)
    res = maas("init", "plain.txt", "--name", "plain-1")
    assert res.exit_code == 0, res.output
    doc = yaml.safe_load((tmp_path / "plain-1.yaml").read_text())
    assert doc["data"]["header"] is False
    assert (doc["data"]["text_column"], doc["data"]["label_column"]) == (0, 1)
    assert doc["registry"]["model_name"] == "plain-1"


def test_two_label_candidates_name_the_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    df = reviews()
    df["rating"] = np.where(df["opinion"] == "good", 5, 1)
    df.to_csv(tmp_path / "two.csv", index=False)
    res = maas("init", "two.csv")
    assert res.exit_code == 2, res.output
    assert "'opinion'" in res.output and "'rating'" in res.output
    assert "--label-column" in res.output
    assert not (tmp_path / "two.yaml").exists()
    res = maas("init", "two.csv", "--label-column", "rating")
    assert res.exit_code == 0, res.output
    assert PipelineConfig.load(tmp_path / "two.yaml").data.label_column == "rating"


@pytest.mark.parametrize(("args", "message"), [
    (["missing.csv"], "does not exist"),
    (["data.xlsx"], "cannot tell the format"),
    (["shop.csv", "--name", "bad name!"], "--name"),
    (["shop.csv", "--text-column", "nope"], "--text-column: no column 'nope'"),
    (["shop.csv", "--test", "other.csv"], "labels"),
])
def test_bad_arguments_exit_2(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    reviews().to_csv(tmp_path / "shop.csv", index=False)
    (tmp_path / "data.xlsx").write_bytes(b"PK\x03\x04")
    other = reviews(40)
    other["opinion"] = "neutral"
    other.to_csv(tmp_path / "other.csv", index=False)
    res = maas("init", *args)
    assert res.exit_code == 2, res.output
    assert message in res.output


def test_existing_file_needs_force(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reviews().to_csv(tmp_path / "shop.csv", index=False)
    (tmp_path / "shop.yaml").write_text("keep me\n")
    res = maas("init", "shop.csv")
    assert res.exit_code == 2 and "--force" in res.output
    assert (tmp_path / "shop.yaml").read_text() == "keep me\n"
    assert maas("init", "shop.csv", "--force").exit_code == 0


def test_mixed_image_sizes_name_the_flag(tmp_path):
    from PIL import Image

    from pipelines.config import ConfigError
    from pipelines.init_detect import detect

    for cls, side in (("a", 8), ("b", 64)):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("L", (side, side), color=i * 40).save(tmp_path / cls / f"{i}.png")
    with pytest.raises(ConfigError, match="--image-size"):
        detect(tmp_path)
    found = detect(tmp_path, image_size=16)
    assert (found.family, found.image_size, found.channels) == ("image_classifier", 16, 1)
    assert found.classes == ("a", "b")


@pytest.mark.slow
def test_init_then_run_registers_a_champion(tmp_path, monkeypatch, mlflow_store,
                                            tiny_checkpoint):
    """What a user runs: `maas init DATA --test TEST --name NAME`, then `maas run NAME.yaml`
    (here on the tiny BERT, one short trial, so that it takes seconds)."""
    monkeypatch.chdir(tmp_path)
    reviews(160).to_csv(tmp_path / "train.csv", index=False)
    reviews(60, seed=2).to_csv(tmp_path / "test.csv", index=False)
    assert maas("init", "train.csv", "--test", "test.csv", "--name", "shop").exit_code == 0
    res = maas("run", "shop.yaml", "--no-build", "--set", f"model.checkpoint={tiny_checkpoint}",
               "--set", "tuning.n_trials=1", "--set", "tuning.max_epochs=1",
               "--set", "promotion.thresholds={}", "--set", "compression.variants=[]")
    assert res.exit_code == 0, res.output
    mv = mlflow.MlflowClient().get_model_version_by_alias("shop", "champion")
    assert str(mv.version) == "1"
