"""registry/: the gate (pure), and register / promote / rollback / describe on a real MLflow
SQLite registry. One store and one tiny logged pyfunc model per module (cheap); every test uses
its own registered-model name."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import warnings

import pytest

from registry import (
    CHALLENGER,
    CHAMPION,
    Decision,
    RegistryError,
    champion,
    describe,
    format_table,
    promote,
    register,
    rollback,
    should_promote,
)

# --------------------------------------------------------------------------------------------
# should_promote: pure
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "candidate, incumbent, min_delta, thresholds, expected, reason_has",
    [
        ({"accuracy": 0.70}, None, 0.0, None, True, "no incumbent"),
        ({"accuracy": 0.85}, {"accuracy": 0.80}, 0.05, None, True, "delta +0.0500"),
        ({"accuracy": 0.90}, {"accuracy": 0.80}, 0.05, None, True, ">= min_delta"),
        ({"accuracy": 0.82}, {"accuracy": 0.80}, 0.05, None, False, "< min_delta 0.05"),
        ({"accuracy": 0.79}, {"accuracy": 0.80}, 0.0, None, False, "< min_delta"),
        ({"accuracy": 0.90, "f1": 0.60}, None, 0.0, {"f1": 0.7}, False, "f1 >= 0.7 failed"),
        ({"accuracy": 0.90}, {"accuracy": 0.5}, 0.0, {"f1": 0.7}, False, "candidate has no f1"),
        ({"f1": 0.9}, None, 0.0, None, False, "candidate has no accuracy"),
        ({"accuracy": 0.9}, {"loss": 0.1}, 0.0, None, False, "incumbent champion has no"),
        ({"accuracy": 0.9, "f1": 0.8}, {"accuracy": 0.8}, 0.0, {"f1": 0.7, "accuracy": 0.5},
         True, "all thresholds met"),
    ],
    ids=["no-incumbent", "beats-by-exactly-min-delta", "beats-by-more", "beats-by-less",
         "worse", "threshold-fails", "threshold-metric-missing", "primary-metric-missing",
         "incumbent-lacks-metric", "thresholds-and-delta-ok"],
)
def test_should_promote_table(candidate, incumbent, min_delta, thresholds, expected, reason_has):
    d = should_promote(candidate, incumbent, "accuracy", min_delta=min_delta,
                       thresholds=thresholds)
    assert d.promote is expected
    assert reason_has in d.reason
    assert d.reason.startswith("promote" if expected else "reject")


def test_decision_fields_and_tags():
    d = should_promote({"accuracy": 0.82, "f1": 0.6}, {"accuracy": 0.80}, "accuracy",
                       min_delta=0.05, thresholds={"f1": 0.7, "recall": 0.5})
    assert not d.promote
    assert d.candidate == 0.82 and d.incumbent == 0.80
    assert d.delta == pytest.approx(0.02)
    assert d.failed_thresholds["f1"] == 0.6 and math.isnan(d.failed_thresholds["recall"])
    assert "f1 >= 0.7 failed" in d.reason and "no recall" in d.reason and "min_delta" in d.reason
    tags = d.to_tags()
    assert all(k.startswith("maas.decision.") and isinstance(v, str) for k, v in tags.items())
    assert tags["maas.decision.promote"] == "false"
    assert json.loads(tags["maas.decision.thresholds"]) == {"f1": 0.7, "recall": 0.5}
    assert set(d.to_dict()) >= {"promote", "reason", "metric", "failed_thresholds"}
    first = should_promote({"accuracy": 0.5}, None, "accuracy")
    assert first.incumbent is None and first.delta is None
    assert first.to_tags()["maas.decision.incumbent"] == ""
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.promote = False
    assert first.promote is True


# --------------------------------------------------------------------------------------------
# Against a real SQLite registry
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(tracking uri, model uri): a SQLite store with one tiny logged pyfunc model."""
    import mlflow
    import mlflow.pyfunc

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: list[str], params=None) -> list[str]:
            return model_input

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        exp = mlflow.create_experiment("registry-tests", artifact_location=str(root / "art"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mlflow.start_run(experiment_id=exp):
                info = mlflow.pyfunc.log_model(name="model", python_model=Echo(),
                                               pip_requirements=[])
        yield uri, info.model_uri, exp


@pytest.fixture
def reg(store, request):
    """Per test: the module store as the tracking URI, a unique model name, and a helper that
    registers the logged model for a fresh real run with the given metrics."""
    import mlflow

    uri, model_uri, exp = store
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    name = "m-" + request.node.name.replace("[", "-").replace("]", "")

    def new_version(accuracy: float = 0.8, **tags):
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "accuracy", accuracy)
        client.set_terminated(run.info.run_id)
        mv = register(model_uri, name, run_id=run.info.run_id,
                      tags={"maas.metric.accuracy": accuracy, **tags})
        return mv, run.info.run_id

    yield name, new_version, client, model_uri
    mlflow.set_tracking_uri(uri)


def test_register_sets_challenger_lineage_and_is_idempotent(reg):
    name, new_version, client, model_uri = reg
    mv, run_id = new_version(0.8, **{"maas.data_sha256": "abc", "maas.n_rows": 400})
    assert str(mv.version) == "1"
    assert mv.status == "READY"
    assert CHALLENGER in mv.aliases
    assert mv.tags["maas.run_id"] == run_id
    assert mv.tags["maas.metric.accuracy"] == "0.8"
    assert mv.tags["maas.n_rows"] == "400"  # values stored as str
    assert mv.tags["maas.model_uri"] == model_uri
    assert mv.tags["maas.registration"] == "complete"

    # A retried step with the same run id gets the same version back, not a second one.
    again = register(model_uri, name, run_id=run_id, tags={"maas.data_sha256": "abc"})
    assert str(again.version) == "1"
    assert len(client.search_model_versions(f"name='{name}'")) == 1

    mv2, _ = new_version(0.9)
    assert str(mv2.version) == "2"
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == "2"
    assert champion(name) is None


def test_register_failure_leaves_no_half_made_version(reg, monkeypatch):
    import mlflow

    name, new_version, client, model_uri = reg
    new_version(0.7)

    def broken(self, *args, **kwargs):  # fault injection: the alias write fails
        raise RuntimeError("registry went away")

    with monkeypatch.context() as mp:
        mp.setattr(mlflow.MlflowClient, "set_registered_model_alias", broken)
        with pytest.raises(RuntimeError, match="went away"):
            register(model_uri, name, run_id="run-that-fails", tags={"k": "v"})
    versions = client.search_model_versions(f"name='{name}'")
    assert [str(v.version) for v in versions] == ["1"]
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == "1"
    # the retry then succeeds and makes exactly one new version
    mv = register(model_uri, name, run_id="run-that-fails")
    assert CHALLENGER in mv.aliases and mv.tags["maas.run_id"] == "run-that-fails"


def test_register_finishes_a_version_left_pending_by_a_killed_call(reg):
    name, new_version, client, model_uri = reg
    new_version(0.7)
    # what a process killed between "version created" and "alias set" leaves behind
    client.create_model_version(name, model_uri, tags={"maas.run_id": "killed",
                                                       "maas.registration": "pending"})
    mv = register(model_uri, name, run_id="killed", description="retried")
    assert str(mv.version) == "2" and CHALLENGER in mv.aliases
    assert mv.tags["maas.registration"] == "complete" and mv.description == "retried"
    assert len(client.search_model_versions(f"name='{name}'")) == 2


def test_promote_moves_champion_and_records_evidence(reg):
    name, new_version, _, _ = reg
    v1, _ = new_version(0.80)
    v2, _ = new_version(0.85)

    assert promote(name, v1.version, actor="alice") == "1"
    mv1 = champion(name)
    assert str(mv1.version) == "1"
    assert mv1.tags["maas.previous_champion"] == ""
    assert mv1.tags["maas.promoted_by"] == "alice"
    assert mv1.tags["maas.promoted_at"].endswith("Z")

    d = should_promote({"accuracy": 0.85}, {"accuracy": 0.80}, "accuracy", min_delta=0.01)
    assert isinstance(d, Decision) and d.promote
    assert promote(name, int(v2.version), d, actor="pipeline") == "2"
    mv2 = champion(name)
    assert str(mv2.version) == "2"
    assert mv2.tags["maas.previous_champion"] == "1"
    assert mv2.tags["maas.promoted_by"] == "pipeline"
    assert mv2.tags["maas.decision.promote"] == "true"
    assert float(mv2.tags["maas.decision.delta"]) == pytest.approx(0.05)

    # already champion: no error, nothing moves, evidence untouched, attempt recorded
    promoted_at = mv2.tags["maas.promoted_at"]
    assert promote(name, "2", actor="bob") == "2"
    mv2 = champion(name)
    assert mv2.tags["maas.promoted_by"] == "pipeline"
    assert mv2.tags["maas.promoted_at"] == promoted_at
    outcomes = sorted(json.loads(v)["outcome"] for k, v in mv2.tags.items()
                      if k.startswith("maas.promotion_attempt."))
    assert outcomes == ["noop", "promoted"]


def test_rejected_decision_is_recorded_without_moving_alias(reg):
    name, new_version, client, _ = reg
    v1, _ = new_version(0.80)
    promote(name, v1.version)
    v2, _ = new_version(0.79)
    d = should_promote({"accuracy": 0.79}, {"accuracy": 0.80}, "accuracy", min_delta=0.0)
    assert not d.promote
    assert promote(name, v2.version, d, actor="pipeline") == "1"
    assert str(champion(name).version) == "1"
    mv2 = client.get_model_version(name, "2")
    assert CHALLENGER in mv2.aliases and CHAMPION not in mv2.aliases
    assert mv2.tags["maas.decision.promote"] == "false"
    assert "min_delta" in mv2.tags["maas.decision.reason"]
    assert "maas.promoted_at" not in mv2.tags
    attempts = [json.loads(v) for k, v in mv2.tags.items()
                if k.startswith("maas.promotion_attempt.")]
    assert [a["outcome"] for a in attempts] == ["rejected"]


def test_rollback_walks_back_the_chain(reg):
    name, new_version, client, _ = reg
    for acc in (0.80, 0.81, 0.82):
        mv, _ = new_version(acc)
        promote(name, mv.version)
    assert str(champion(name).version) == "3"

    assert rollback(name) == "2"
    assert str(champion(name).version) == "2"
    assert client.get_model_version(name, "3").tags["maas.rolled_back_at"]
    assert rollback(name) == "1"
    assert str(champion(name).version) == "1"
    with pytest.raises(ValueError, match="no previous champion"):
        rollback(name)
    assert str(champion(name).version) == "1"

    # a new promotion after rollbacks chains from the restored champion
    promote(name, "3")
    assert champion(name).tags["maas.previous_champion"] == "1"


def test_unknown_model_version_and_no_champion_errors(reg):
    name, new_version, _, _ = reg
    with pytest.raises(RegistryError, match="unknown registered model 'nope'"):
        promote("nope", 1)
    with pytest.raises(RegistryError, match="unknown registered model"):
        rollback("nope")
    with pytest.raises(RegistryError, match="unknown registered model"):
        describe("nope")
    assert champion("nope") is None
    new_version()
    with pytest.raises(RegistryError, match=rf"model '{name}' has no version '7'"):
        promote(name, 7)
    with pytest.raises(RegistryError, match="has no champion"):
        rollback(name)
    assert champion(name) is None


def test_describe_rows_and_table(reg):
    name, new_version, _, _ = reg
    v1, run1 = new_version(0.80)
    promote(name, v1.version, actor="ci")
    v2, _ = new_version(0.78)
    promote(name, v2.version,
            should_promote({"accuracy": 0.78}, {"accuracy": 0.80}, "accuracy"))
    rows = describe(name)
    assert [r["version"] for r in rows] == ["2", "1"]
    r2, r1 = rows
    assert r1["aliases"] == [CHAMPION] and r2["aliases"] == [CHALLENGER]
    assert r1["run_id"] == run1
    assert r1["metrics"] == {"accuracy": 0.80}
    assert r1["promoted_by"] == "ci" and r1["decision"] is None
    assert r2["decision"] == "reject" and "min_delta" in r2["decision_reason"]
    assert r1["created_at"].endswith("Z")
    table = format_table(rows)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["version", "aliases", "created", "run"]
    assert "accuracy" in lines[0] and "0.8000" in table and "champion" in table
    assert len(lines) == 4
    assert format_table([]) == "(no versions)"


def test_concurrent_promotions_leave_one_champion_and_both_attempts(reg):
    name, new_version, client, _ = reg
    v1, _ = new_version(0.80)
    promote(name, v1.version)
    versions = [new_version(0.9)[0].version, new_version(0.91)[0].version]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def go(v):
        try:
            barrier.wait()
            promote(name, v, actor=f"worker-{v}")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    final = str(champion(name).version)
    assert final in {str(v) for v in versions}
    attempts = []
    for v in versions:
        tags = client.get_model_version(name, str(v)).tags
        attempts += [json.loads(x) for k, x in tags.items()
                     if k.startswith("maas.promotion_attempt.")]
    assert len(attempts) == 2
    assert {a["actor"] for a in attempts} == {f"worker-{v}" for v in versions}
    # the last attempt to finish saw the final champion
    assert any(a["champion"] == final for a in attempts)
    assert all(a["outcome"] in {"promoted", "superseded"} for a in attempts)
    # the champion's recorded predecessor is a real earlier champion, so rollback works
    assert rollback(name) in {"1", *(str(v) for v in versions)} - {final}
