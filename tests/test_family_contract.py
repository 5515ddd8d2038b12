"""The family contract, proven: a model family that MaaS does not know (``tests/toy_family``, an
MLP on two numeric columns, copied into a temporary package of its own name) runs the whole path
through the ``maas`` CLI with nothing changed anywhere else: ``maas suite init`` drafts its suite
from the family's per-row profile, ``maas run`` validates, tunes (Optuna, nested MLflow runs),
registers, promotes and builds a bento from the family's own service folder, ``bentoml serve``
answers over HTTP, and the registered model loads with ``mlflow.pyfunc`` in a fresh process.
The run leaves the user's folder as it found it apart from its stores (no lock files)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
TOY = Path(__file__).resolve().parent / "toy_family"
CENTRES = {"a": (0.0, 0.0), "b": (3.0, 0.0), "c": (0.0, 3.0)}


def _rows(n_per_class: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    parts = [pd.DataFrame({"x1": rng.normal(cx, 0.6, n_per_class).round(4),
                           "x2": rng.normal(cy, 0.6, n_per_class).round(4), "label": label})
             for label, (cx, cy) in CENTRES.items()]
    return pd.concat(parts).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def _pipeline(pkg: str, uri: str) -> str:
    return textwrap.dedent(f"""\
        name: toy-contract
        tracking_uri: {uri}
        data: {{path: train.csv, test_path: test.csv, split: {{validation: 0.2, seed: 1}}}}
        validation: {{suite: toy.suite.json}}
        model:
          family: {pkg}.family:ToyTabular
          options: {{hidden: 16}}
        tuning:
          n_trials: 2
          max_epochs: 4
          sampler_seed: 1
          search_space:
            learning_rate: {{type: float, low: 0.005, high: 0.05, log: true}}
        promotion: {{metric: accuracy, min_delta: 0.0, thresholds: {{accuracy: 0.8}}}}
        registry: {{model_name: toy-contract}}
        bento: {{enabled: true, workers: 1}}
        """)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The user's folder (data, pipeline file) and the family's package, outside the repo."""
    root = tmp_path_factory.mktemp("contract")
    pkg = f"toyfam_{uuid.uuid4().hex[:8]}"
    shutil.copytree(TOY, root / "src" / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    work = root / "work"
    work.mkdir()
    _rows(100, 1).to_csv(work / "train.csv", index=False)
    _rows(30, 2).to_csv(work / "test.csv", index=False)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    (work / "pipeline.yaml").write_text(_pipeline(pkg, uri), "utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(REPO)]),
           "BENTOML_HOME": str(root / "bentoml"), "MLFLOW_TRACKING_URI": uri}
    return {"root": root, "work": work, "pkg": pkg, "uri": uri, "env": env}


def maas(toy, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=toy["work"],
                          env=toy["env"], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ran(toy):
    """`maas suite init` then `maas run` of the toy pipeline; the champion version."""
    from mlflow import MlflowClient

    before = {p.name for p in toy["work"].iterdir()}
    init = maas(toy, "suite", "init", "pipeline.yaml")
    assert init.returncode == 0, init.stdout + init.stderr
    run = maas(toy, "run", "pipeline.yaml")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    client = MlflowClient(tracking_uri=toy["uri"], registry_uri=toy["uri"])
    mv = client.get_model_version_by_alias("toy-contract", "champion")
    return {"before": before, "mv": mv, "client": client, "stdout": run.stdout}


def test_a_family_outside_maas_is_named_by_import_path_only(toy):
    from pipelines.families import FAMILIES

    assert not any(toy["pkg"] in path for path in FAMILIES.values())
    assert "ToyTabular" in (TOY / "family.py").read_text("utf-8")


@pytest.mark.slow  # the module's `maas run` (and `bentoml serve`)
def test_the_whole_path_runs_and_registers_the_family(toy, ran):
    mv, client = ran["mv"], ran["client"]
    tags = mv.tags
    assert tags["maas.family"] == f"{toy['pkg']}.family:ToyTabular"
    assert tags["maas.service"] == f"{toy['pkg']}.service.service:ToyService"
    assert tags["maas.runtime"] == "torch" and "maas.variants" not in tags  # no variants
    assert float(tags["maas.metric.accuracy"]) >= 0.9
    suite = json.loads((toy["work"] / "toy.suite.json").read_text("utf-8"))
    ranged = {e["kwargs"]["column"] for e in suite["expectations"]
              if e["type"] == "expect_column_values_to_be_between"}
    assert ranged == {"x1", "x2"}  # drafted from the family's profile, not from text
    parent = client.get_run(mv.run_id)
    assert parent.data.tags["maas.suite_success"] == "true"
    trials = client.search_runs([parent.info.experiment_id],
                                f"tags.mlflow.parentRunId = '{mv.run_id}'")
    states = sorted(t.data.tags.get("maas.trial_state") for t in trials)
    assert len(trials) == 2 and "COMPLETE" in states and set(states) <= {"COMPLETE", "PRUNED"}
    assert all("val_accuracy" in t.data.metrics for t in trials)  # per-epoch, nested runs


@pytest.mark.slow  # the module's `maas run` (and `bentoml serve`)
def test_the_run_leaves_the_users_folder_as_it_found_it(toy, ran):
    """Apart from its stores (mlflow.db, optuna.db, MLflow's artifacts) and the drafted suite:
    no lock files, no data-docs folder (the gate passed)."""
    after = {p.name for p in toy["work"].iterdir()}
    new = after - ran["before"]
    assert not [n for n in new if n.endswith(".lock") or "lock" in n], sorted(new)
    assert new <= {"mlflow.db", "optuna.db", "mlruns", "mlartifacts", "toy.suite.json"}, \
        sorted(new)


@pytest.mark.slow  # the module's `maas run` (and `bentoml serve`)
def test_the_bento_serves_the_family_over_http(toy, ran):
    from bentos.server import serve_bento

    tag = ran["client"].get_run(ran["mv"].run_id).data.tags["maas.bento_tag"]
    env = {"PYTHONPATH": str(REPO)}  # the bento carries the family's service: no package needed
    with serve_bento(tag, bentoml_home=toy["root"] / "bentoml", env=env) as srv:
        r = httpx.post(f"{srv.url}/classify", json={"rows": [[0, 0], [3, 0], [0, 3]]},
                       timeout=30)
        assert r.status_code == 200, r.text
        assert [p["label"] for p in r.json()] == ["a", "b", "c"]
        assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in r.json())
        meta = httpx.post(f"{srv.url}/metadata", json={}, timeout=30).json()
        assert meta["labels"] == ["a", "b", "c"] and meta["runtime"] == "torch"
        bad = httpx.post(f"{srv.url}/classify", json={"rows": [[1, 2, 3]]}, timeout=30)
        assert bad.status_code == 400


@pytest.mark.slow  # the module's `maas run` (and `bentoml serve`)
def test_the_registered_model_loads_in_a_fresh_process(toy, ran):
    code = ("import mlflow, pandas as pd; m = mlflow.pyfunc.load_model("
            "'models:/toy-contract@champion'); "
            "print(m.predict(pd.DataFrame({'x1': [3.0], 'x2': [0.0]})).argmax(1).tolist())")
    env = {**toy["env"], "PYTHONPATH": str(REPO)}  # not the family's package
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, cwd=toy["root"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[1]"  # "b", the second label


def test_the_familys_options_are_checked_by_its_schema(toy):
    from pipelines.config import ConfigError, PipelineConfig

    sys.path.insert(0, str(toy["root"] / "src"))
    try:
        with pytest.raises(ConfigError, match=r"model.options.hidden"):
            PipelineConfig.load(toy["work"] / "pipeline.yaml",
                                {"model.options": {"hidden": 1}})
        with pytest.raises(ConfigError, match=r"model.family.*cannot import"):
            PipelineConfig.load(toy["work"] / "pipeline.yaml",
                                {"model.family": "no_such_pkg.family:Nope"})
    finally:
        sys.path.remove(str(toy["root"] / "src"))
