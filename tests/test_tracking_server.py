"""Tracking-server mode: a real ``mlflow server`` on PostgreSQL with proxied artifacts.

* the whole pipeline through the server (``maas run``, then ``maas build NAME@champion``);
* the basic-auth app: no default admin credential, anonymous writes refused, a user with
  credentials drives ``registry`` end to end, another user without a grant is kept out;
* path traversal probes against the proxied artifact API and the run/model-version artifact
  routes: refused, nothing written outside the artifacts destination, the secret never read;
* eight processes registering versions of one model at once: versions 1..8, none lost.

The servers (conftest.py: one plain, one basic-auth, each once per session and shared with other
modules) run in their own process groups on 127.0.0.1 and are killed with them afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from helpers import (
    ADMIN_PASSWORD,
    GATE,
    REPO,
    Server,
    client_env,
    communicate_all,
    log_echo_model,
    maas,
    open_gate,
    request,
    tracking_to,
    write_pipeline,
)

pytestmark = [pytest.mark.postgres, pytest.mark.slow]  # tracking servers


# --------------------------------------------------------------------------------------------
# Fixtures: the plain ``tracking_server`` (one per session, shared with other modules: every test
# here uses its own experiment and model names) and the basic-auth ``auth_server`` are in
# conftest.py.
# --------------------------------------------------------------------------------------------


@pytest.fixture
def server(tracking_server) -> Server:
    return tracking_server


# --------------------------------------------------------------------------------------------
# a. The pipeline through the server
# --------------------------------------------------------------------------------------------


def _artifact_dir(experiment) -> str:
    """The experiment's folder under the server's artifacts destination (proxied artifacts:
    ``mlflow-artifacts:/<id>``)."""
    location = experiment.artifact_location
    assert location.startswith("mlflow-artifacts:"), location
    return location.removeprefix("mlflow-artifacts:").strip("/")


@pytest.mark.slow
def test_pipeline_through_tracking_server_then_build_from_alias(
        server, tmp_path, pg_url, tiny_checkpoint, monkeypatch):
    from mlflow import MlflowClient

    name = "srv-tiny"
    pipe = write_pipeline(tmp_path, tiny_checkpoint, name="srv", registry__model_name=name,
                          tracking_uri=server.url)
    # `maas` in this process as a client of the server without credentials: where the run and
    # the bento go is what this checks, not a process boundary
    env = {"MLFLOW_TRACKING_URI": server.url, "MLFLOW_TRACKING_USERNAME": None,
           "MLFLOW_TRACKING_PASSWORD": None, "BENTOML_HOME": str(tmp_path / "bentoml"),
           "MAAS_HEARTBEAT_S": "2"}
    monkeypatch.chdir(tmp_path)  # a local store would land here
    t0 = time.monotonic()
    with tracking_to(server.url):
        res = maas("run", pipe, "--storage", pg_url, "--no-build", env=env)
    assert res.exit_code == 0, f"maas run failed ({res.exit_code}):\n{res.output[-5000:]}"
    run_s = time.monotonic() - t0
    # nothing was written to a local store: no sqlite beside the pipeline, no ./mlruns
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    assert not (tmp_path / "optuna.db").exists()

    with tracking_to(server.url):
        client = MlflowClient()
        exp = client.get_experiment_by_name("srv")
        assert exp is not None and exp.artifact_location.startswith("mlflow-artifacts:")
        parents = client.search_runs([exp.experiment_id], "tags.`maas.role` = 'pipeline'")
        assert len(parents) == 1
        parent = parents[0]
        assert parent.info.status == "FINISHED"
        assert parent.data.tags["maas.status"] == "finished"
        assert parent.data.tags["optuna.storage"].startswith("postgresql://")
        trials = client.search_runs(
            [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        trial_runs = [r for r in trials if "maas.trial_number" in r.data.tags]
        assert len(trial_runs) == 2
        assert {r.data.tags["maas.trial_state"] for r in trial_runs} <= {"COMPLETE", "PRUNED"}
        assert all("val_accuracy" in r.data.metrics for r in trial_runs)

        # the registered version: lineage tags, challenger + champion, decision recorded
        mv = client.get_model_version_by_alias(name, "champion")
        assert str(mv.version) == "1"
        tags = mv.tags
        assert tags["maas.run_id"] == parent.info.run_id
        assert tags["maas.registration"] == "complete"
        assert tags["maas.data_fingerprint"] == parent.data.tags["maas.data_fingerprint"]
        assert tags["maas.config_hash"] == parent.data.tags["maas.config_hash"]
        assert tags["maas.study"] == parent.data.tags["optuna.study"]
        assert tags["maas.suite_success"] == "true"
        # the version carries the evaluation's test accuracy, and the tiny model is no worse
        # than a coin (it learns the majority class: 0.58 on this split; inverted or shifted
        # predictions give 0.42)
        accuracy = float(tags["maas.metric.accuracy"])
        assert accuracy == pytest.approx(parent.data.metrics["test_accuracy"], abs=1e-6)
        assert accuracy >= 0.5
        assert tags["maas.decision.promote"] == "true"
        assert tags["maas.promoted_by"] == "pipeline"
        attempts = [json.loads(v) for k, v in tags.items()
                    if k.startswith("maas.promotion_attempt.")]
        assert [a["outcome"] for a in attempts] == ["promoted"]
        assert client.get_model_version_by_alias(name, "challenger").version == mv.version
        # the model's files went through the proxy into the server's artifacts destination
        # (the experiment's own folder there: the server is shared with other tests)
        assert any((server.artifacts / _artifact_dir(exp)).rglob("MLmodel"))
        # the Optuna study is in PostgreSQL, not in MLflow
        import optuna

        (summary,) = optuna.get_all_study_summaries(pg_url)
        assert summary.study_name == parent.data.tags["optuna.study"]
        assert summary.n_trials == 2

    # a bento from the alias, against the same server
    t1 = time.monotonic()
    with tracking_to(server.url):
        res = maas("build", f"{name}@champion", env=env)
    assert res.exit_code == 0, f"maas build failed ({res.exit_code}):\n{res.output[-5000:]}"
    assert f"v{mv.version}" in res.output and "bento " in res.output
    build_s = time.monotonic() - t1
    print(f"maas run through server: {run_s:.0f} s; maas build from alias: {build_s:.0f} s")
    assert any((tmp_path / "bentoml" / "bentos").rglob("bento.yaml"))


# --------------------------------------------------------------------------------------------
# b. Auth on
# --------------------------------------------------------------------------------------------

ANON_WRITES = [
    ("/api/2.0/mlflow/experiments/create", {"name": "anon-exp"}),
    ("/api/2.0/mlflow/registered-models/create", {"name": "anon-model"}),
    ("/api/2.0/mlflow/users/create", {"username": "mallory", "password": "x" * 12}),
]


def test_auth_default_admin_refused_and_anonymous_writes_refused(auth_server):
    srv = auth_server
    assert request(srv, "GET", "/health")[0] == 200  # health stays open for probes
    search = "/api/2.0/mlflow/experiments/search?max_results=10"
    # the credential earlier MLflow versions shipped is not accepted
    assert request(srv, "GET", search, auth=("admin", "password1234"))[0] == 401
    assert request(srv, "GET", search, auth=("admin", ""))[0] == 401
    assert request(srv, "GET", search)[0] == 401
    for path, body in ANON_WRITES:
        status, data = request(srv, "POST", path, body)
        assert status in (401, 403), (path, status, data[:300])
        status, _ = request(srv, "POST", path, body, auth=("admin", "password1234"))
        assert status in (401, 403), (path, status)
    # the configured admin password works
    assert request(srv, "GET", search, auth=("admin", ADMIN_PASSWORD))[0] == 200
    # and nothing the anonymous calls asked for exists
    status, data = request(srv, "GET", "/api/2.0/mlflow/registered-models/get?name=anon-model",
                           auth=("admin", ADMIN_PASSWORD))
    assert status == 404, data[:300]
    status, data = request(srv, "GET", "/api/2.0/mlflow/experiments/get-by-name"
                           "?experiment_name=anon-exp", auth=("admin", ADMIN_PASSWORD))
    assert status == 404, data[:300]


def test_auth_user_drives_registry_other_user_kept_out(auth_server, tmp_path):
    import mlflow
    from mlflow.server import get_app_client

    from registry import CHAMPION, champion, describe, promote, register, rollback

    srv = auth_server
    alice, bob = f"alice-{uuid.uuid4().hex[:6]}", f"bob-{uuid.uuid4().hex[:6]}"
    alice_pw, bob_pw = uuid.uuid4().hex, uuid.uuid4().hex
    with tracking_to(srv.url, MLFLOW_TRACKING_USERNAME="admin",
                     MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD):
        admin = get_app_client("basic-auth", tracking_uri=srv.url)
        admin.create_user(alice, alice_pw)
        admin.create_user(bob, bob_pw)
        # rotate bob's password: the old one stops working (it was never accepted before, so
        # no server worker's credential cache holds it)
        new_bob_pw = uuid.uuid4().hex
        admin.update_user_password(bob, new_bob_pw)
    assert request(srv, "GET", "/api/2.0/mlflow/experiments/search?max_results=1",
                   auth=(bob, bob_pw))[0] == 401
    bob_pw = new_bob_pw

    name = f"auth-model-{uuid.uuid4().hex[:6]}"
    with tracking_to(srv.url, MLFLOW_TRACKING_USERNAME=alice, MLFLOW_TRACKING_PASSWORD=alice_pw):
        model_uri, run1 = log_echo_model(f"auth-exp-{alice}")
        _, run2 = log_echo_model(f"auth-exp-{alice}")
        v1 = register(model_uri, name, run_id=run1, tags={"maas.metric.accuracy": "0.8"})
        v2 = register(model_uri, name, run_id=run2, tags={"maas.metric.accuracy": "0.9"})
        assert (str(v1.version), str(v2.version)) == ("1", "2")
        assert promote(name, v1.version, actor="alice") == "1"
        assert promote(name, v2.version, actor="alice") == "2"
        assert str(champion(name).version) == "2"
        assert [r["version"] for r in describe(name)] == ["2", "1"]
        assert rollback(name) == "1"
        assert str(champion(name).version) == "1"
        # the champion's files come back through the authenticated artifact proxy
        loaded = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
        assert list(loaded.predict(["x"])) == ["x"]
        exp = mlflow.get_experiment_by_name(f"auth-exp-{alice}")

    # bob (authenticated, no grant; default_permission NO_PERMISSIONS) cannot read or move it
    q = f"name={name}"
    status, _ = request(srv, "GET", f"/api/2.0/mlflow/registered-models/get?{q}",
                        auth=(bob, bob_pw))
    assert status == 403
    status, _ = request(srv, "POST", "/api/2.0/mlflow/registered-models/alias",
                        {"name": name, "alias": "champion", "version": "2"}, auth=(bob, bob_pw))
    assert status == 403
    with tracking_to(srv.url, MLFLOW_TRACKING_USERNAME=bob, MLFLOW_TRACKING_PASSWORD=bob_pw):
        with pytest.raises(mlflow.exceptions.MlflowException) as err:
            promote(name, "2", actor="bob")
        assert "403" in str(err.value) or "PERMISSION_DENIED" in str(err.value)
    with tracking_to(srv.url, MLFLOW_TRACKING_USERNAME=alice, MLFLOW_TRACKING_PASSWORD=alice_pw):
        assert str(champion(name).version) == "1"
    # anonymous reads of the model are refused as well
    assert request(srv, "GET", f"/api/2.0/mlflow/registered-models/get?{q}")[0] == 401

    # the proxied artifact API follows the experiment's permissions: the model's files
    mlmodel = next((srv.artifacts / _artifact_dir(exp)).rglob("MLmodel"))  # alice's model
    rel = mlmodel.relative_to(srv.artifacts).as_posix()
    assert request(srv, "GET", f"{ART}/{rel}", auth=(alice, alice_pw))[0] == 200
    assert request(srv, "GET", f"{ART}/{rel}")[0] == 401
    status, body = request(srv, "GET", f"{ART}/{rel}", auth=(bob, bob_pw))
    assert status == 403 and b"flavors" not in body, (status, body[:200])
    evil = f"{ART}/{rel.rsplit('/', 1)[0]}/evil.txt"
    assert request(srv, "PUT", evil, b"EVIL")[0] == 401
    assert request(srv, "PUT", evil, b"EVIL", auth=(bob, bob_pw))[0] == 403
    assert not (mlmodel.parent / "evil.txt").exists()


# --------------------------------------------------------------------------------------------
# c. Path traversal against the proxied artifact API
# --------------------------------------------------------------------------------------------

ART = "/api/2.0/mlflow-artifacts/artifacts"


def _traversal_probes(outside: Path) -> list[str]:
    """Paths that would leave the artifacts destination if the server resolved them naively.
    ``outside`` is the planted file's folder (the destination's parent)."""
    abs_secret = str(outside / "secret.txt")
    return [
        f"{ART}/../secret.txt",
        f"{ART}/ok/../../secret.txt",
        f"{ART}/%2e%2e/secret.txt",
        f"{ART}/%2e%2e%2fsecret.txt",
        f"{ART}/ok/..%2f..%2fsecret.txt",
        f"{ART}/%252e%252e%252fsecret.txt",              # double-encoded
        f"{ART}/%25252e%25252e%25252fsecret.txt",        # triple-encoded
        f"{ART}/{abs_secret}",                           # //abs/path
        f"{ART}/{abs_secret.replace('/', '%2f')}",
        f"{ART}/file:{abs_secret}",
        f"{ART}/file%3a%2f%2f{abs_secret.replace('/', '%2f')}",
        f"{ART}/ok/%2e%2e/%2e%2e/secret.txt",
    ]


# On POSIX a backslash is an ordinary file-name character, and so are the bytes of an overlong
# UTF-8 "/" (%c0%af): MLflow treats `..\x` or `..\xc0\xafx` as one odd name, which the PUT may
# create -- inside the destination. (A Windows server would see `..\` as a parent step.)
ODD_NAME_PROBES = [f"{ART}/..\\secret.txt", f"{ART}/..%5csecret.txt",
                   f"{ART}/ok\\..\\..\\secret.txt", f"{ART}/%2e%2e%5c%2e%2e%5csecret.txt",
                   f"{ART}/..%c0%afsecret.txt", f"{ART}/..%c0%af..%c0%afsecret.txt"]


def _snapshot(root: Path, skip: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in root.rglob("*")
            if p.is_file() and skip not in p.parents and not p.name.endswith(".log")}


def test_artifact_path_traversal_refused(server):
    srv = server
    outside = srv.artifacts.parent
    secret = "TOP-SECRET-" + uuid.uuid4().hex
    (outside / "secret.txt").write_text(secret)
    (srv.artifacts / "ok").mkdir(exist_ok=True)
    (srv.artifacts / "ok" / "inside.txt").write_text("fine")
    before = _snapshot(outside, srv.artifacts)
    marker = b"PWNED-" + uuid.uuid4().hex.encode()

    # sanity: the proxy does serve and accept files inside the destination
    assert request(srv, "GET", f"{ART}/ok/inside.txt") == (200, b"fine")
    assert request(srv, "PUT", f"{ART}/ok/new.txt", marker)[0] == 200
    assert (srv.artifacts / "ok" / "new.txt").read_bytes() == marker

    refused: list[tuple[str, str, int]] = []
    for path in _traversal_probes(outside):
        status, body = request(srv, "GET", path)
        assert secret.encode() not in body, f"GET {path} leaked the secret"
        assert 400 <= status < 500, f"GET {path} -> {status} {body[:200]!r}"
        put = path.replace("secret.txt", "pwned.txt")
        status, body = request(srv, "PUT", put, marker)
        assert 400 <= status < 500, f"PUT {put} -> {status} {body[:200]!r}"
        refused.append((path, "GET/PUT", status))
    # listing outside the destination
    for q in ["..", "%2e%2e", "ok/../..", "..%2f", str(outside), "%2f"]:
        status, body = request(srv, "GET", f"{ART}?path={q}")
        assert 400 <= status < 500, f"list {q} -> {status} {body[:200]!r}"
        assert b"secret.txt" not in body
    # backslashes, overlong UTF-8: never the secret, and any write lands inside the destination
    odd_puts = []
    for path in ODD_NAME_PROBES:
        status, body = request(srv, "GET", path)
        assert secret.encode() not in body and status in (400, 403, 404), (path, status)
        status, _ = request(srv, "PUT", path.replace("secret.txt", "pwned.txt"), marker)
        assert status < 500, (path, status)
        odd_puts.append((path, status))
    print("odd-name PUTs (POSIX: one file name, inside the destination):", odd_puts)

    # nothing outside the destination was created or changed; the secret is intact
    assert _snapshot(outside, srv.artifacts) == before
    assert (outside / "secret.txt").read_text() == secret
    assert not list(Path("/tmp").glob("pwned.txt")) and not Path("/pwned.txt").exists()
    for p in srv.artifacts.rglob("*pwned*"):  # an odd name is one file, inside
        assert srv.artifacts in p.parents and p.read_bytes() == marker
        print("created inside the destination:", repr(str(p.relative_to(srv.artifacts))))


def test_run_and_model_version_artifact_routes_refuse_traversal(server):
    """The tracking API's own artifact routes, and experiments whose artifact_location tries to
    leave the destination, cannot be used to read the planted secret."""
    srv = server
    outside = srv.artifacts.parent
    secret = "TOP-SECRET-" + uuid.uuid4().hex
    (outside / "secret.txt").write_text(secret)
    exp = f"trav-{uuid.uuid4().hex[:6]}"
    status, data = request(srv, "POST", "/api/2.0/mlflow/experiments/create", {"name": exp})
    assert status == 200, data
    eid = json.loads(data)["experiment_id"]
    status, data = request(srv, "POST", "/api/2.0/mlflow/runs/create", {"experiment_id": eid})
    run_id = json.loads(data)["run"]["info"]["run_id"]
    for p in ["../../../secret.txt", "..%2f..%2f..%2fsecret.txt", str(outside / "secret.txt"),
              "%2e%2e/%2e%2e/%2e%2e/secret.txt", "..\\..\\..\\secret.txt"]:
        for route in (f"/get-artifact?run_uuid={run_id}&path={p}",
                      f"/api/2.0/mlflow/artifacts/list?run_id={run_id}&path={p}"):
            status, body = request(srv, "GET", route)
            assert secret.encode() not in body, (route, status)
            if status == 200 and "/list" in route:
                assert not json.loads(body).get("files"), (route, body[:300])
            if "\\" in p:  # POSIX: one odd name; an empty listing / 404 is fine
                assert status in (200, 400, 404), (route, status)
            else:
                assert 400 <= status < 500, (route, status)

    # registry sources outside the destination are refused at registration
    request(srv, "POST", "/api/2.0/mlflow/registered-models/create", {"name": exp})
    for source in [str(outside), f"file://{outside}", "mlflow-artifacts:/../",
                   "mlflow-artifacts:/%2e%2e/"]:
        status, body = request(srv, "POST", "/api/2.0/mlflow/model-versions/create",
                               {"name": exp, "source": source})
        assert 400 <= status < 500, (source, status, body[:200])
    status, body = request(srv, "GET",
                           f"/model-versions/get-artifact?name={exp}&version=1&path=../secret.txt")
    assert secret.encode() not in body and 400 <= status < 500

    # An experiment may be created with an artifact_location that escapes the destination
    # (MLflow accepts `mlflow-artifacts:/../..`): its runs' uploads are still refused by the
    # proxy, and nothing outside is served back.
    status, data = request(srv, "POST", "/api/2.0/mlflow/experiments/create",
                           {"name": exp + "-esc", "artifact_location": "mlflow-artifacts:/../.."})
    if status == 200:
        eid = json.loads(data)["experiment_id"]
        status, data = request(srv, "POST", "/api/2.0/mlflow/runs/create",
                               {"experiment_id": eid})
        info = json.loads(data)["run"]["info"]
        rel = info["artifact_uri"][len("mlflow-artifacts:"):].lstrip("/")
        status, _ = request(srv, "PUT", f"{ART}/{rel}/pwned.txt", b"PWNED")
        assert 400 <= status < 500
        for p in ["secret.txt", "../secret.txt", "../../secret.txt"]:
            status, body = request(srv, "GET", f"/get-artifact?run_uuid={info['run_id']}&path={p}")
            assert secret.encode() not in body
    assert not list(outside.parent.rglob("pwned.txt"))


# --------------------------------------------------------------------------------------------
# d. Eight registrations at once
# --------------------------------------------------------------------------------------------

_REGISTER = textwrap.dedent("""\
    import sys, time, warnings
    warnings.simplefilter("ignore")
    from registry import register
    """) + GATE + textwrap.dedent("""\
    model_uri, name, run_id = sys.argv[2], sys.argv[3], sys.argv[4]
    t0 = time.time()
    mv = register(model_uri, name, run_id=run_id, tags={"maas.metric.accuracy": "0.5"})
    print(f"{mv.version} {mv.status} {time.time() - t0:.2f}")
    """)


@pytest.mark.slow
def test_eight_parallel_registrations_get_versions_1_to_8(server, tmp_path):
    from mlflow import MlflowClient

    name = f"par-{uuid.uuid4().hex[:6]}"
    with tracking_to(server.url):
        model_uri, _ = log_echo_model("parallel-registrations")
        client = MlflowClient()
        exp = client.get_experiment_by_name("parallel-registrations").experiment_id
        run_ids = []
        for _ in range(8):  # register() is idempotent per run id: one run per registration
            run = client.create_run(exp)
            client.set_terminated(run.info.run_id)
            run_ids.append(run.info.run_id)
    script = tmp_path / "register_one.py"
    script.write_text(_REGISTER)
    env = client_env(server, PYTHONPATH=str(REPO))
    ready = [tmp_path / f"ready-{i}" for i in range(len(run_ids))]
    procs = [subprocess.Popen([sys.executable, str(script), str(f), model_uri, name, rid],
                              env=env, cwd=tmp_path, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for f, rid in zip(ready, run_ids, strict=True)]
    open_gate(procs, ready, timeout_s=240)  # all 8 have imported mlflow: released at once
    outs = communicate_all(procs, timeout=240)
    failed = [(rc, err[-2000:]) for rc, _, err in outs if rc != 0]
    assert not failed, f"{len(failed)} of 8 registrations failed: {failed[:2]}"
    late = [o for o in outs if float(o[1].split()[2]) > 60]
    assert not late
    reported = sorted(int(o[1].split()[0]) for o in outs)
    assert reported == list(range(1, 9))
    with tracking_to(server.url):
        versions = MlflowClient().search_model_versions(f"name = '{name}'")
        assert sorted(int(v.version) for v in versions) == list(range(1, 9))
        assert all(v.status == "READY" for v in versions)
        assert all(v.tags.get("maas.registration") == "complete" for v in versions)
        assert sorted(v.tags["maas.run_id"] for v in versions) == sorted(run_ids)
        ch = MlflowClient().get_model_version_by_alias(name, "challenger")
        assert 1 <= int(ch.version) <= 8
