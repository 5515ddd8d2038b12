"""Own PyTorch modules (``model.module``, issue 19): the contract checked before training (a table
of bad modules, each with its message and exit code, nothing registered), constructors that take
any subset of the data's facts, hidden-state modules, and one tiny own model trained per test run
that a fresh process loads through ``mlflow.pyfunc`` (without MaaS or the user's folder) and
``bentoml serve`` answers ``/classify`` with."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from helpers import made_once_per_run
from own_modules import BAD, BAG, CONV, HIDDEN

from pipelines.cli import main
from pipelines.config import ConfigError, PipelineConfig

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO / "data" / "sst2"
TINY = REPO / "pipelines" / "examples" / "tiny_transformer.py"


def _pipeline(work: Path, module: str, **model) -> dict:
    return {
        "name": "own-test", "tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
        "data": {"path": str(SST2 / "train_sample.tsv"), "format": "tsv",
                 "text_column": "sentence", "label_column": "label", "max_rows": 300,
                 "label_names": {0: "negative", 1: "positive"},
                 "test_path": str(SST2 / "test.tsv")},
        "model": {"module": module, "max_length": 32, "tokenizer": {"vocab_size": 500},
                  **model},
        "tuning": {"n_trials": 1, "max_epochs": 1, "fixed": {"batch_size": 32},
                   "search_space": {"learning_rate": {"type": "float", "low": 1e-3,
                                                      "high": 2e-3}}},
        "promotion": {"thresholds": {}},
        "registry": {"model_name": "own-test"},
        "compression": {"variants": []},
        "bento": {"enabled": False},
    }


def _write(work: Path, source: str | None, cls: str, **model) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    if source is not None:
        (work / "user_model.py").write_text(source, "utf-8")
    path = work / "pipe.yaml"
    path.write_text(yaml.safe_dump(_pipeline(work, f"user_model.py:{cls}", **model)), "utf-8")
    return path


def _registered(work: Path) -> list:
    from mlflow import MlflowClient

    db = work / "mlflow.db"
    return MlflowClient(f"sqlite:///{db}").search_registered_models() if db.exists() else []


# -- the bad-input table: message and exit code, nothing registered ---------------------------
BAD_CASES = [
    # (case, source or None = no file, class, exit code, words in the message)
    ("missing_file", None, "Bag", 2, ["model.module: file not found", "user_model.py"]),
    ("missing_class", BAG, "Nope", 2, ["has no class 'Nope'", "Bag"]),
    ("not_a_module", BAD["not_a_module"], "NotAModule", 2, ["not a torch.nn.Module subclass"]),
    ("wrong_signature", BAD["wrong_signature"], "Three", 2,
     ["wrong signature", "forward(input_ids, attention_mask) or forward(input_ids)"]),
    ("import_raises", BAD["import_raises"], "Any", 2,
     ["importing", "ImportError", "sentencepiece_fake", "user_model.py line 4"]),
    ("wrong_shape", BAD["wrong_shape"], "Wide", 2,
     ["returned shape (32, 5)", "num_labels=2", "logits [32, 2]"]),
    ("nan_loss", BAD["nan_loss"], "Nan", 2, ["loss on one training batch is nan"]),
    ("forward_raises", BAD["forward_raises"], "Boom", 2,
     ["forward on one training batch", "RuntimeError: kaboom in forward",
      "user_model.py line 11"]),
]


@pytest.mark.parametrize("case,source,cls,code,words", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_modules_stop_the_run_with_exit_2(tmp_path, case, source, cls, code, words):
    path = _write(tmp_path, source, cls)
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == code, result.output
    message = " ".join(result.output.split())
    for word in words:
        assert word in message, message
    assert "Traceback" not in result.output
    assert _registered(tmp_path) == []


def test_init_arguments_are_checked_against_the_constructor(tmp_path):
    path = _write(tmp_path, BAG, "Bag", init={"depth": 3})
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 2
    assert "model.init.depth: user_model.py:Bag.__init__ takes no argument 'depth'" \
        in result.output
    path = _write(tmp_path, BAG, "Bag", init={"num_labels": 3})
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 2 and "model.init.num_labels: decided by the data" in result.output


@pytest.mark.parametrize("model,error", [
    ({"checkpoint": "/some/folder"}, "an own module is trained from scratch"),
    ({"module": "user_model:Bag"}, "expected 'path/to/file.py:ClassName'"),
])
def test_config_errors_name_the_field(tmp_path, model, error):
    raw = _pipeline(tmp_path, "user_model.py:Bag")
    raw["model"].update(model)
    (tmp_path / "user_model.py").write_text(BAG)
    with pytest.raises(ConfigError, match="model") as exc:
        PipelineConfig.from_dict(raw, base_dir=tmp_path)
    assert error in str(exc.value)
    raw = _pipeline(tmp_path, "user_model.py:Bag")
    del raw["model"]["module"]
    raw["model"]["init"] = {"width": 3}
    with pytest.raises(ConfigError, match="init: constructor arguments need model.module"):
        PipelineConfig.from_dict(raw, base_dir=tmp_path)


# -- good modules of several shapes ----------------------------------------------------------
def _facts_model(source: str, cls: str, kind: str, facts: dict, batch):
    import torch

    from pipelines.families import own_model as om
    from pipelines.families import user_module as um
    from pipelines.families.own_runtime import sha256_file

    path = Path(os.environ["OWN_TMP"]) / f"{cls}.py"
    path.write_text(source, "utf-8")
    spec = um.ModuleSpec(path, cls, sha256_file(path))
    y = torch.tensor([0, 1])
    return om.make(spec, kind, facts, {}, ["a", "b"], batch, y, seed=1)


@pytest.fixture
def own_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("OWN_TMP", str(tmp_path))
    return tmp_path


def test_constructor_gets_the_facts_it_names_and_forward_without_mask(own_tmp):
    import torch

    facts = {"vocab_size": 50, "num_labels": 2, "max_length": 8, "pad_token_id": 0}
    ids = torch.tensor([[3, 4, 5], [6, 7, 0]])
    m = _facts_model(BAG, "Bag", "text", facts, (ids, (ids > 0).long()))
    assert m.meta["init"] == {"vocab_size": 50, "num_labels": 2}
    assert m.meta["takes_mask"] is False and m.meta["head_dim"] is None
    assert tuple(m.net(ids, None).shape) == (2, 2)


def test_hidden_states_get_a_pooled_head(own_tmp):
    import torch

    facts = {"vocab_size": 50, "num_labels": 2, "max_length": 8, "pad_token_id": 0}
    ids = torch.tensor([[3, 4, 5], [6, 7, 0]])
    m = _facts_model(HIDDEN, "Hidden", "text", facts, (ids, (ids > 0).long()))
    assert m.meta["head_dim"] == 8 and m.meta["takes_mask"] is True
    assert tuple(m.net(ids, (ids > 0).long()).shape) == (2, 2)


def test_image_contract_and_save_load_roundtrip(own_tmp):
    import numpy as np
    import torch

    from pipelines.families import own_model as om

    facts = {"in_channels": 1, "num_labels": 2, "image_size": 6}
    x = torch.rand(2, 1, 6, 6)
    m = _facts_model(CONV, "Conv", "image", facts, (x, None))
    om.save(m, own_tmp / "saved")
    back = om.load(own_tmp / "saved")
    arrays = list(np.random.default_rng(0).random((3, 1, 6, 6), dtype=np.float32))
    assert np.allclose(om.predict_proba(m, arrays), om.predict_proba(back, arrays), atol=1e-6)
    assert not list((own_tmp / "saved").glob("*.pkl"))


# -- one tiny own model per test run: fresh-process load, bentoml serve -----------------------
def _train_own(out: Path) -> None:
    from pipelines.run import run_pipeline

    user = out / "user"
    user.mkdir()
    (user / "tiny.py").write_text(TINY.read_text("utf-8"), "utf-8")
    raw = _pipeline(out, str(user / "tiny.py") + ":TinyTransformer",
                    init={"d_model": 32, "layers": 1, "ff": 64})
    raw["tuning"]["max_epochs"] = 2
    raw["compression"] = {"variants": ["onnx"], "speed_rounds": 1, "latency_samples": 5}
    raw["bento"] = {"enabled": True, "workers": 1, "max_batch_size": 8, "torch_threads": 1}
    path = out / "pipe.yaml"
    path.write_text(yaml.safe_dump(raw), "utf-8")
    with pytest.MonkeyPatch.context() as mp:  # BENTOML_HOME put back afterwards
        mp.setenv("BENTOML_HOME", str(out / "bentoml"))
        result = run_pipeline(PipelineConfig.load(path))
    sha = hashlib.sha256((user / "tiny.py").read_bytes()).hexdigest()
    for f in user.iterdir():  # the user's folder is gone: the model must carry its source
        f.unlink()
    user.rmdir()
    (out / "result.json").write_text(json.dumps({
        "bento_tag": result.bento_tag, "version": result.model_version, "sha256": sha,
        "variant": result.variant, "champion": result.champion_version}))


@pytest.fixture(scope="session")
def trained_own(tmp_path_factory) -> tuple[Path, dict]:
    out = made_once_per_run(tmp_path_factory, "own-module-tiny", _train_own)
    return out, json.loads((out / "result.json").read_text())


FRESH = """
import json, sys
sys.modules["pipelines"] = None  # MaaS must not be needed to load the model
sys.modules["bentos"] = None
import mlflow
model = mlflow.pyfunc.load_model("models:/own-test@champion")
out = model.predict(["a gorgeous , witty , seductive movie .", "a dull , lifeless mess ."])
print(json.dumps(out.to_dict(orient="records")))
"""


@pytest.mark.slow
def test_fresh_process_loads_the_pyfunc_from_another_folder(trained_own, tmp_path):
    out, result = trained_own
    assert str(result["champion"]) == "1"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{out / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, "-c", FRESH], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [set(r) for r in rows] == [{"label", "negative", "positive"}] * 2
    assert all(abs(r["negative"] + r["positive"] - 1) < 1e-5 for r in rows)


@pytest.mark.slow
def test_lineage_and_card_carry_the_module_sha256(trained_own):
    from mlflow import MlflowClient

    out, result = trained_own
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    mv = client.get_model_version("own-test", result["version"])
    run = client.get_run(mv.run_id)
    assert run.data.tags["maas.module_sha256"] == result["sha256"]
    assert run.data.tags["maas.module"] == "tiny.py:TinyTransformer"
    assert result["sha256"] in (mv.description or "")


@pytest.mark.slow
def test_bentoml_serve_answers_classify(trained_own, monkeypatch):
    """The bento the run built (the chosen variant) and one of the fp32 torch model (the user's
    module run by maas_own_runtime.py inside the bento) answer /classify alike."""
    import httpx

    from bentos import BentoSettings, build_bento
    from bentos.server import serve_bento

    out, result = trained_own
    assert result["bento_tag"], result
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    monkeypatch.setenv("BENTOML_HOME", str(out / "bentoml"))
    fp32 = build_bento("models:/own-test@champion",
                       settings=BentoSettings(variant="fp32", workers=1, torch_threads=1))
    texts = ["a gorgeous , witty , seductive movie .", "a dull , lifeless mess ."]
    answers = {}
    for tag, variant in ((result["bento_tag"], result["variant"]), (fp32.bento_tag, "fp32")):
        with serve_bento(tag, bentoml_home=out / "bentoml",
                         log_path=out / f"server-{variant}.log") as running:
            answer = httpx.post(f"{running.url}/classify", json={"texts": texts}, timeout=30)
            meta = httpx.get(f"{running.url}/metadata", timeout=10).json()
        assert answer.status_code == 200, answer.text
        assert meta["variant"] == variant
        answers[variant] = answer.json()
    assert answers["fp32"][0]["probabilities"].keys() == {"negative", "positive"}
    chosen = answers[result["variant"]]
    assert [a["label"] for a in answers["fp32"]] == [a["label"] for a in chosen]
    assert meta["module"] == "TinyTransformer" and meta["module_sha256"] == result["sha256"]


# -- images: the same contract, forward(x); the pyfunc and the image bento's runtime ----------
def test_own_image_module_trains_logs_and_loads_in_a_fresh_process(tmp_path):
    import mlflow
    import numpy as np
    from image_support import DIGITS, FAMILY, copy_digits, pipeline_cfg

    from bentos.image_classifier import maas_runtime
    from pipelines.data import load_data, split_data
    from pipelines.families import load_family

    (tmp_path / "conv.py").write_text(CONV, "utf-8")
    data_dir = copy_digits(tmp_path / "digits", per_class=10)
    cfg = pipeline_cfg(data_dir, copy_digits(tmp_path / "test", "test", per_class=3),
                       data_options={"image_size": 8, "channels": 1},
                       model={"family": FAMILY, "module": f"{tmp_path / 'conv.py'}:Conv"})
    family = load_family(cfg)
    family.check()
    data = split_data(load_data(cfg.data, family), cfg.data)
    trainer = family.trainer(data, {"learning_rate": 3e-3, "batch_size": 8}, seed=0)
    assert trainer.model.meta["init"] == {"in_channels": 1, "num_labels": 3, "image_size": 8}
    assert np.isfinite(trainer.train_epoch())
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.set_experiment("own-image")
    with mlflow.start_run(experiment_id=experiment.experiment_id):
        uri = family.log_model(trainer.model, "model").model_uri
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri,
                                                     dst_path=str(tmp_path / "dl")))
    x = np.stack(family.inputs(data.test))
    want = family.predict_proba(trainer.model, list(x))
    served = maas_runtime.load_runtime(local, None, {}, threads=1)
    assert np.allclose(served.probabilities(x), want, atol=1e-5)
    assert maas_runtime.read_meta(local)["channels"] == 1
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, json, numpy as np, mlflow; sys.modules['pipelines'] = None; "
            f"m = mlflow.pyfunc.load_model({str(local)!r}); "
            f"print(json.dumps(m.predict(np.load({str(tmp_path / 'x.npy')!r})).iloc[:, 1:]"
            ".values.tolist()))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    (tmp_path / "conv.py").unlink()  # the source travels with the model
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.array(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert np.allclose(got, want, atol=1e-5)
    assert DIGITS.is_dir()


def test_maas_init_file_takes_model_module_without_other_edits(tmp_path, monkeypatch, caplog):
    """`maas init`'s file + one `module:` line loads and passes the module checks (its
    checkpoint line does not conflict); with it, the study tunes the file's from-scratch
    learning rates (module_search_space), not the fine-tuning ones, and nothing warns; without
    them the fine-tuning rates get a warning."""
    from pipelines.families import load_family

    monkeypatch.chdir(tmp_path)
    lines = (SST2 / "train_sample.tsv").read_text("utf-8").splitlines()[:301]
    (tmp_path / "reviews.tsv").write_text("\n".join(lines) + "\n", "utf-8")
    (tmp_path / "bag.py").write_text(BAG, "utf-8")
    result = CliRunner().invoke(main, ["init", "reviews.tsv", "--name", "reviews"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "reviews.yaml").read_text("utf-8")
    assert "# module:" in text and "checkpoint: package:" in text
    text = text.replace("  family: text_classifier\n",
                        "  family: text_classifier\n  module: bag.py:Bag\n", 1)
    (tmp_path / "reviews.yaml").write_text(text, "utf-8")
    cfg = PipelineConfig.load(tmp_path / "reviews.yaml")
    assert cfg.model.module == f"{tmp_path / 'bag.py'}:Bag"
    assert cfg.tuning.space(True)["learning_rate"].low == 1e-3
    assert cfg.tuning.space(False)["learning_rate"].high == 2e-4  # the checkpoint's: unchanged
    with caplog.at_level("WARNING", logger="pipelines.families.user_module"):
        load_family(cfg).check()
    assert "a fine-tuning rate" not in caplog.text
    text = text.replace("    learning_rate: {type: float, low: 1.0e-3, high: 3.0e-3, log: true}\n",
                        "", 1).replace("  module_search_space:", "  module_search_space: {}")
    (tmp_path / "reviews.yaml").write_text(text, "utf-8")
    with caplog.at_level("WARNING", logger="pipelines.families.user_module"):
        load_family(PipelineConfig.load(tmp_path / "reviews.yaml")).check()
    assert "a fine-tuning rate" in caplog.text


@pytest.mark.slow
def test_a_checkpoint_run_compares_with_an_own_module_champion(tmp_path, tiny_checkpoint):
    """The gate loads the champion by what was logged: an own-module champion is scored by a
    run that fine-tunes a checkpoint under the same registered name (and the reverse path is
    the checkpoint loader, unchanged)."""
    from mlflow import MlflowClient

    path = _write(tmp_path, BAG, "Bag")
    first = CliRunner().invoke(main, ["run", str(path), "--no-build"])
    assert first.exit_code == 0, first.output
    raw = yaml.safe_load(path.read_text("utf-8"))
    raw["model"] = {"checkpoint": str(tiny_checkpoint), "max_length": 32}
    path.write_text(yaml.safe_dump(raw), "utf-8")
    second = CliRunner().invoke(main, ["run", str(path), "--no-build"])
    assert second.exit_code == 0, second.output
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(client.get_model_version("own-test", "2").run_id)
    assert run.data.tags["maas.champion_compared"] == "1"
    assert "champion_test_accuracy" in run.data.metrics
