"""Champion-alias webhooks (``bentos.webhook``, ``maas webhook``).

* ``verify`` and ``route``: pure table tests (signature, timestamp window, replay, headers);
* the receiver app in process with a recording build function: what is built, what is refused;
* marked ``postgres`` and ``slow``: a real ``mlflow server`` on PostgreSQL delivering to a real
  ``maas webhook serve`` (through a recording relay on 127.0.0.1, so that a delivery can be
  replayed byte for byte): ``maas promote`` 1, ``maas promote`` 2 and ``maas rollback`` (in
  process) each rebuild exactly one bento and tag it on the version; a replay, a duplicate
  event, a forged and a tampered delivery build nothing.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import QuietJSONHandler, local_http_server

from bentos.webhook import (
    DELIVERY_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Rebuilder,
    create_app,
    route,
    sign,
    verify,
)
from bentos.webhook_register import webhook_name, webhook_url

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cret-for-tests-0123456789"
NOW = 1_800_000_000
DID = "3f6c1a52-8a2e-4a34-9d59-6f0d2c1f2b7e"


def _body(name="m", alias="champion", version="2", action="created") -> bytes:
    data = {"name": name, "alias": alias, **({"version": version} if version else {})}
    return json.dumps({"entity": "model_version_alias", "action": action,
                       "timestamp": "2027-01-15T08:00:00+00:00", "data": data}).encode()


def _headers(body: bytes, *, secret=SECRET, did=DID, ts=NOW, drop=(), **override) -> dict:
    h = {"Content-Type": "application/json", DELIVERY_ID_HEADER: did,
         TIMESTAMP_HEADER: str(ts), SIGNATURE_HEADER: sign(secret, did, ts, body)}
    h.update(override)
    return {k: v for k, v in h.items() if k not in drop}


BODY = _body()

# (case, headers, body, now, seen) -> (ok, status, reason fragment)
VERIFY_CASES = [
    ("good", _headers(BODY), BODY, NOW, (), (True, 200, "ok")),
    ("good, lower-case header names", {k.lower(): v for k, v in _headers(BODY).items()}, BODY,
     NOW, (), (True, 200, "ok")),
    ("good, at the window's old edge", _headers(BODY), BODY, NOW + 300, (), (True, 200, "ok")),
    ("good among several signatures",
     _headers(BODY, **{SIGNATURE_HEADER: "v1,AAAA " + sign(SECRET, DID, NOW, BODY)}), BODY, NOW,
     (), (True, 200, "ok")),
    ("wrong secret", _headers(BODY, secret="another-secret-0123456789"), BODY, NOW, (),
     (False, 401, "bad signature")),
    ("tampered body", _headers(BODY), _body(version="1"), NOW, (),
     (False, 401, "bad signature")),
    ("signature of another delivery id",
     _headers(BODY, **{SIGNATURE_HEADER: sign(SECRET, "other-id", NOW, BODY)}), BODY, NOW, (),
     (False, 401, "bad signature")),
    ("timestamp changed after signing", _headers(BODY, **{TIMESTAMP_HEADER: str(NOW + 1)}), BODY,
     NOW, (), (False, 401, "bad signature")),
    ("signature without version prefix",
     _headers(BODY, **{SIGNATURE_HEADER: sign(SECRET, DID, NOW, BODY)[3:]}), BODY, NOW, (),
     (False, 401, "bad signature")),
    ("stale timestamp", _headers(BODY), BODY, NOW + 301, (), (False, 401, "stale")),
    ("future timestamp", _headers(BODY), BODY, NOW - 301, (), (False, 401, "future")),
    ("replayed delivery id", _headers(BODY), BODY, NOW, {DID}, (False, 409, "replay")),
    ("missing signature", _headers(BODY, drop=(SIGNATURE_HEADER,)), BODY, NOW, (),
     (False, 400, SIGNATURE_HEADER)),
    ("missing timestamp", _headers(BODY, drop=(TIMESTAMP_HEADER,)), BODY, NOW, (),
     (False, 400, TIMESTAMP_HEADER)),
    ("missing delivery id", _headers(BODY, drop=(DELIVERY_ID_HEADER,)), BODY, NOW, (),
     (False, 400, DELIVERY_ID_HEADER)),
    ("no headers at all", {}, BODY, NOW, (), (False, 400, "missing header")),
    ("timestamp not unix seconds", _headers(BODY, **{TIMESTAMP_HEADER: "2027-01-15T08:00"}),
     BODY, NOW, (), (False, 400, "malformed")),
    ("delivery id with a dot", _headers(BODY, did="a.1"), BODY, NOW, (),
     (False, 400, "malformed")),
]


@pytest.mark.parametrize(("headers", "body", "now", "seen", "expected"),
                         [c[1:] for c in VERIFY_CASES], ids=[c[0] for c in VERIFY_CASES])
def test_verify(headers, body, now, seen, expected):
    v = verify(SECRET, headers, body, now, 300, seen)
    assert (v.ok, v.status) == expected[:2], v.reason
    assert expected[2].lower() in v.reason.lower()
    if v.ok:
        assert (v.delivery_id, v.timestamp) == (DID, NOW)


def test_sign_is_mlflows_scheme():
    """MLflow signs ``f"{delivery_id}.{timestamp}.{payload}"`` with HMAC-SHA256 and sends
    ``v1,<base64>`` (mlflow/webhooks/delivery.py); the real server's deliveries are verified in
    the integration test below."""
    import base64
    import hashlib
    import hmac

    mac = hmac.new(SECRET.encode(), f"{DID}.{NOW}.{BODY.decode()}".encode(), hashlib.sha256)
    assert sign(SECRET, DID, NOW, BODY) == "v1," + base64.b64encode(mac.digest()).decode()


def _event(body: bytes) -> dict:
    return json.loads(body)


ROUTE_CASES = [
    ("champion created", _event(BODY), None, None, ("build", "m", "2")),
    ("champion deleted", _event(_body(action="deleted", version=None)), None, None,
     ("forget", "m", None)),
    ("challenger alias", _event(_body(alias="challenger")), None, None, ("ignore", "m", None)),
    ("another model's event on this model's webhook", _event(_body(name="other")), "m", None,
     ("ignore", "other", None)),
    ("this model's webhook", _event(BODY), "m", None, ("build", "m", "2")),
    ("model not served here", _event(BODY), None, frozenset({"x"}), ("ignore", "m", None)),
    ("not an alias event", {"entity": "model_version_tag", "action": "set", "data": {}}, None,
     None, ("ignore", None, None)),
    ("MLflow's test payload", {"entity": "model_version_alias", "action": "created",
                               "data": {"name": "example_model", "alias": "example_alias",
                                        "version": "1"}}, "m", None,
     ("ignore", "example_model", None)),
]


@pytest.mark.parametrize(("event", "webhook_model", "models", "expected"),
                         [c[1:] for c in ROUTE_CASES], ids=[c[0] for c in ROUTE_CASES])
def test_route(event, webhook_model, models, expected):
    r = route(event, webhook_model=webhook_model, models=models)
    assert (r.action, r.name, r.version) == expected, r.reason


@pytest.mark.parametrize(("data", "field"), [
    ({"alias": "champion", "version": "1"}, "body.data.name"),
    ({"name": "m", "version": "1"}, "body.data.alias"),
    ({"name": "m", "alias": "champion", "version": "one"}, "body.data.version"),
])
def test_route_names_the_bad_field(data, field):
    with pytest.raises(ValueError, match=field):
        route({"entity": "model_version_alias", "action": "created", "data": data})


def test_webhook_name_and_url():
    assert webhook_name("sst2-sentiment") == "maas-champion-sst2-sentiment"
    odd = webhook_name("team/model name")
    assert odd.startswith("maas-champion-team-model-name-") and odd != webhook_name("team-model")
    assert len(webhook_name("x" * 200)) <= 62
    assert webhook_url("http://h:1/webhook?a=1&model=z", "m a") == \
        "http://h:1/webhook?a=1&model=m+a"


@pytest.mark.parametrize(("args", "secret", "code", "message"), [
    (["--url", "http://127.0.0.1:1/webhook"], "0123456789abcdef-long", 4,
     "webhooks are delivered by an MLflow tracking server"),
    (["--url", "http://127.0.0.1:1/webhook"], "short", 2, "at least 16 characters"),
    (["--url", "ftp://host/x"], "0123456789abcdef-long", 2, "expected http(s)://"),
])
def test_register_refusals(tmp_path, monkeypatch, args, secret, code, message):
    """On a SQLite store (no server: nothing would ever deliver), with a short secret or a bad
    URL, `maas webhook register` exits non-zero, says why and prints no secret."""
    import mlflow
    from click.testing import CliRunner

    from pipelines.cli import main

    uri, previous = f"sqlite:///{tmp_path / 'mlflow.db'}", mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        res = CliRunner().invoke(main, ["webhook", "register", "m", *args],
                                 env={"MAAS_WEBHOOK_SECRET": secret})
    finally:
        mlflow.set_tracking_uri(previous)
    assert not (tmp_path / "mlflow.db").exists()  # refused before touching any store
    assert res.exit_code == code and message in res.output, res.output
    assert secret not in res.output


# --------------------------------------------------------------------------------------------
# The app in process: a recording build function instead of BentoML
# --------------------------------------------------------------------------------------------


class Registry:
    """Champion per model, and the builds asked for (the app's three callables)."""

    def __init__(self):
        self.champion: dict[str, str] = {}
        self.built: list[tuple[str, str]] = []
        self.tags: dict[tuple[str, str], str] = {}
        self.fail_next = False

    def rebuilder(self) -> Rebuilder:
        def build(name):
            if self.fail_next:
                self.fail_next = False
                raise RuntimeError("build failed")
            version = self.champion[name]
            self.built.append((name, version))
            return f"{name}:b{len(self.built)}", version

        return Rebuilder(build, self.champion.get,
                         lambda n, v, tag: self.tags.__setitem__((n, v), tag))


@pytest.fixture
def app_client():
    from starlette.testclient import TestClient

    reg = Registry()
    clock = {"now": float(NOW)}
    rebuilder = reg.rebuilder()
    app = create_app(SECRET, rebuilder, window_s=300, clock=lambda: clock["now"])
    with TestClient(app) as client:
        def post(body, path="/webhook?model=m", **kw):
            resp = client.post(path, content=body, headers=_headers(body, **kw))
            assert rebuilder.wait_idle(10)
            return resp

        yield reg, post, client


def test_app_builds_once_per_champion_move(app_client):
    reg, post, client = app_client
    reg.champion["m"] = "1"
    assert post(_body(version="1"), did="d1").status_code == 202
    assert reg.built == [("m", "1")] and reg.tags[("m", "1")] == "m:b1"
    assert post(_body(version="1"), did="d1").status_code == 409          # replay
    assert post(_body(version="1"), did="d2").status_code == 202          # duplicate event
    assert reg.built == [("m", "1")]
    reg.champion["m"] = "2"
    assert post(_body(version="2"), did="d3").status_code == 202
    reg.champion["m"] = "1"                                                # rollback
    assert post(_body(version="1"), did="d4").status_code == 202
    assert reg.built == [("m", "1"), ("m", "2"), ("m", "1")]
    assert reg.tags[("m", "1")] == "m:b3"
    status = client.get("/status").json()
    assert status["skipped"] == 1 and len(status["builds"]) == 3
    assert status["deliveries"] == {"accepted": 4, "rejected": 1}


def test_app_refuses_and_ignores_without_building(app_client):
    reg, post, _ = app_client
    reg.champion["m"] = "1"
    assert post(BODY, secret="forged-secret-0123456789", did="f1").status_code == 401
    resp = post(b"not json", did="f2")
    assert resp.status_code == 400 and "not JSON" in resp.json()["reason"]
    assert post(_body(alias="challenger"), did="f3").status_code == 200
    assert post(_body(name="other"), did="f4").status_code == 200
    assert post(BODY, ts=NOW - 3600, did="f5").status_code == 401
    assert post(b"x" * (70 * 1024), did="f6").status_code == 413
    assert reg.built == []


def test_app_champion_deleted_then_set_again_builds_again(app_client):
    reg, post, _ = app_client
    reg.champion["m"] = "1"
    assert post(_body(version="1"), did="g1").status_code == 202
    assert post(_body(action="deleted", version=None), did="g2").status_code == 200
    assert post(_body(version="1"), did="g3").status_code == 202
    assert reg.built == [("m", "1"), ("m", "1")]


def test_failed_build_is_reported_and_retried_by_the_next_event(app_client):
    reg, post, client = app_client
    assert post(_body(version="1"), did="h0").status_code == 202  # no champion yet: nothing
    assert reg.built == []
    reg.champion["m"], reg.fail_next = "9", True
    assert post(_body(version="9"), did="h1").status_code == 202
    status = client.get("/status").json()
    assert [f["name"] for f in status["failures"]] == ["m"] and status["builds"] == []
    assert post(_body(version="9"), did="h2").status_code == 202
    assert reg.built == [("m", "9")] and reg.tags[("m", "9")] == "m:b1"


# --------------------------------------------------------------------------------------------
# A real tracking server on PostgreSQL -> a real `maas webhook serve`
# --------------------------------------------------------------------------------------------

MODEL = "wh-tiny"
BUILD_TIMEOUT_S = 300


def _post(port: int, path: str, headers: dict, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


class Relay:
    """An HTTP relay on 127.0.0.1: forwards each POST to the receiver unchanged and keeps
    (path, headers, body, status), so a real MLflow delivery can be replayed byte for byte."""

    def __init__(self, target_port: int):
        relay, self.seen = self, []

        class Handler(QuietJSONHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() == "content-type" or k.lower().startswith("x-mlflow-")}
                status, answer = _post(target_port, self.path, headers, body)
                relay.seen.append((self.path, headers, body, status))
                self.answer(status, answer)

        self.server = local_http_server(Handler)
        self.port = self.server.server_address[1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _bento_tags(home: Path) -> list[str]:
    import bentoml

    from bentos.build import bentoml_store_scope

    with bentoml_store_scope():
        assert os.environ["BENTOML_HOME"] == str(home)
        return sorted(str(b.tag) for b in bentoml.bentos.list())


def _wait_builds(port: int, n: int, receiver, log: Path) -> dict:
    """Poll the receiver's /status until it has made ``n`` builds and is idle."""
    deadline = time.monotonic() + BUILD_TIMEOUT_S
    while time.monotonic() < deadline:
        if receiver.poll() is not None:
            pytest.fail(f"receiver exited {receiver.returncode}:\n{log.read_text()[-4000:]}")
        status = _get_json(port, "/status")
        if status["failures"]:
            pytest.fail(f"build failed: {status['failures']}\n{log.read_text()[-4000:]}")
        if len(status["builds"]) >= n and not status["pending"] and not status["building"]:
            return status
        time.sleep(0.5)
    pytest.fail(f"no build #{n} within {BUILD_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


def _maas(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, f"maas {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done


@pytest.mark.postgres
@pytest.mark.slow
def test_promote_and_rollback_each_rebuild_one_bento(tmp_path, tiny_checkpoint, monkeypatch,
                                                      tracking_server):
    from click.testing import CliRunner
    from helpers import client_env, tracking_to
    from mlflow import MlflowClient

    from bentos.testing import load_classifier, register_classifier
    from pipelines.cli import main

    secret = uuid.uuid4().hex + uuid.uuid4().hex
    home = tmp_path / "bentoml"
    # the session's tracking server allows http and loopback receivers (local test only) and
    # has one Fernet key for the webhook secrets shared by its workers (conftest.py)
    monkeypatch.setenv("BENTOML_HOME", str(home))
    monkeypatch.delenv("MAAS_WEBHOOK_SECRET", raising=False)  # only the test's own secret
    srv = tracking_server
    env = client_env(srv, BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="True",
                     MAAS_WEBHOOK_SECRET=secret)
    with _receiver(env, tmp_path) as (receiver, port, log):
        relay = Relay(port)
        try:
            _register_twice(f"http://127.0.0.1:{relay.port}/webhook", env, tmp_path, srv.url,
                            secret)
            with tracking_to(srv.url):
                import mlflow

                # an earlier test's active experiment id means nothing on this server
                mlflow.set_experiment("maas-webhook-test")
                model, tok = load_classifier(tiny_checkpoint)
                assert [register_classifier(model, tok, MODEL, alias="challenger")
                        for _ in range(2)] == ["1", "2"]
            tags_by_step = []
            for n, (args, version) in enumerate([(["promote", MODEL, "1"], "1"),
                                                 (["promote", MODEL, "2"], "2"),
                                                 (["rollback", MODEL], "1")], start=1):
                with tracking_to(srv.url):  # in process: the server's delivery is the point
                    moved = CliRunner().invoke(main, args, catch_exceptions=False)
                assert moved.exit_code == 0 and f"{MODEL}@champion = version {version}" in \
                    moved.output, moved.output
                # a late duplicate build of any step shows in the final count and skip count
                # (_replays_and_forgeries_build_nothing, after its observation window)
                status = _wait_builds(port, n, receiver, log)
                assert len(status["builds"]) == n, status
                built = status["builds"][-1]
                assert built["version"] == version and len(_bento_tags(home)) == n
                with tracking_to(srv.url):
                    mv = MlflowClient().get_model_version(MODEL, version)
                assert mv.tags["maas.bento_tag"] == built["bento_tag"]
                tags_by_step.append(built["bento_tag"])
            assert len(set(tags_by_step)) == 3 and sorted(tags_by_step) == _bento_tags(home)

            _replays_and_forgeries_build_nothing(relay, port, secret, receiver, log)
            assert len(_bento_tags(home)) == 3
        finally:
            relay.close()
            with tracking_to(srv.url):  # the shared server delivers to nobody after this test
                for hook in MlflowClient().list_webhooks():
                    if hook.name == webhook_name(MODEL):
                        MlflowClient().delete_webhook(hook.webhook_id)


@contextlib.contextmanager
def _receiver(env: dict, cwd: Path):
    """`maas webhook serve` on a free 127.0.0.1 port in its own process group, stopped after."""
    from bentos.server import free_port, stop_process

    port, log = free_port(), cwd / "receiver.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "webhook", "serve", "--port", str(port)],
            cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    try:
        _wait_receiver(port, proc, log)
        yield proc, port, log
    finally:
        stop_process(proc)


def _register_twice(url: str, env: dict, cwd: Path, tracking_uri: str, secret: str) -> None:
    """`maas webhook register` as a process (with MLflow's signed test delivery), then again in
    process: one webhook, updated, and the secret printed nowhere."""
    from click.testing import CliRunner
    from helpers import tracking_to
    from mlflow import MlflowClient

    from pipelines.cli import main

    first = _maas(["webhook", "register", MODEL, "--url", url], env, cwd)
    assert first.stdout.startswith("created")
    assert "test delivery: answered HTTP 200" in first.stdout  # MLflow-signed, verified
    with tracking_to(tracking_uri):
        second = CliRunner().invoke(main, ["webhook", "register", MODEL, "--url", url,
                                           "--no-test"],
                                    env={"MAAS_WEBHOOK_SECRET": secret}, catch_exceptions=False)
        assert second.exit_code == 0 and second.output.startswith("updated"), second.output
        assert secret not in first.stdout + first.stderr + second.output
        hooks = [w for w in MlflowClient().list_webhooks() if w.name == webhook_name(MODEL)]
    assert len(hooks) == 1 and hooks[0].url == webhook_url(url, MODEL)


def _wait_receiver(port: int, receiver, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if receiver.poll() is not None:
            pytest.fail(f"receiver exited {receiver.returncode}:\n{log.read_text()[-4000:]}")
        try:
            _get_json(port, "/status")
            return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"receiver not up in {timeout_s} s:\n{log.read_text()[-4000:]}")


def _replays_and_forgeries_build_nothing(relay: Relay, port: int, secret: str, receiver,
                                         log: Path) -> None:
    """The rollback's real delivery replayed, re-sent as a new delivery, forged and tampered."""
    champion = [(path, h, body) for path, h, body, status in relay.seen
                if status == 202 and json.loads(body)["data"].get("alias") == "champion"]
    assert len(champion) == 3, [s[3] for s in relay.seen]
    path, headers, body = champion[-1]
    assert json.loads(body)["data"]["version"] == "1"

    status, answer = _post(port, path, headers, body)  # byte-identical replay
    assert status == 409, answer

    did, ts = uuid.uuid4().hex, str(int(time.time()))  # same event, new delivery (2xx, skipped)
    status, _ = _post(port, path, {**headers, DELIVERY_ID_HEADER: did, TIMESTAMP_HEADER: ts,
                                   SIGNATURE_HEADER: sign(secret, did, ts, body)}, body)
    assert status == 202

    did = uuid.uuid4().hex  # forged: signed with another secret
    status, _ = _post(port, path, {**headers, DELIVERY_ID_HEADER: did, TIMESTAMP_HEADER: ts,
                                   SIGNATURE_HEADER: sign("not-the-secret-0123456789", did, ts,
                                                          body)}, body)
    assert status == 401
    tampered = body.replace(b'"version": "1"', b'"version": "2"')
    assert tampered != body
    status, _ = _post(port, path, {**headers, DELIVERY_ID_HEADER: did}, tampered)
    assert status == 401

    time.sleep(2)  # observation window: a duplicate delivery of any step would be queued by now
    final = _wait_builds(port, 3, receiver, log)
    assert len(final["builds"]) == 3 and final["skipped"] == 1, final
    assert final["deliveries"]["rejected"] >= 3
