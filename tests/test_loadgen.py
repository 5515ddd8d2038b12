"""bentos.loadgen against real sockets on 127.0.0.1: a refused connection is a counted transport
error (the run goes on and ends), a spent time budget leaves requests unsent, and the CPU the
generator spends is its own process's counter."""

from __future__ import annotations

import json
import threading

import pytest
from helpers import QuietJSONHandler, local_http_server

from bentos.loadgen import load
from bentos.server import free_port


@pytest.fixture(scope="module")
def echo_server():
    """A threaded HTTP server that answers /classify like the text service (one positive
    prediction per text) and /slow after 0.2 s."""

    class Handler(QuietJSONHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/slow":
                threading.Event().wait(0.2)
            self.answer(200, json.dumps([{"label": "positive",
                                          "probabilities": {"negative": 0.1, "positive": 0.9}}
                                         for _ in body["texts"]]).encode())

    server = local_http_server(Handler)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_every_request_answered_and_checked(echo_server):
    r = load(f"{echo_server}/classify", [["a"], ["b", "c"]], requests=40, concurrency=8)
    assert (r.ok, r.texts_ok, r.malformed, r.transport_errors) == (40, 60, 0, 0)
    assert len(r.latencies_ms) == 40 and r.cpu_s > 0
    assert r.summary()["statuses"] == {"200": 40}


def test_a_refused_connection_is_counted_not_raised():
    r = load(f"http://127.0.0.1:{free_port()}/classify", [["a"]], requests=5, concurrency=2,
             request_timeout_s=5)
    assert r.transport_errors == 5 and r.ok == 0 and r.error_samples


def test_the_time_budget_leaves_the_rest_unsent(echo_server):
    r = load(f"{echo_server}/slow", [["a"]], requests=200, concurrency=2, time_budget_s=0.5)
    assert r.ok + r.not_sent == 200 and r.not_sent > 150, r.summary()
