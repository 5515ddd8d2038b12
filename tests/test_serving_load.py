"""Load on a real ``bentoml serve`` of a tiny registered model, on 127.0.0.1 only, bounded in
request count and time: 1,000 requests at concurrency 64 get no 5xx and only well-formed answers;
a server with a small ``max_concurrency`` sheds the excess with 429/503, never 500 or a hang, and
stays ready."""

from __future__ import annotations

import httpx
import pytest
from helpers import tiny_registry

from bentos import BentoSettings
from bentos.loadgen import load
from bentos.testing import serve_registered

pytestmark = pytest.mark.slow

MODEL_NAME = "tiny-load"


def _texts() -> list[str]:
    from pathlib import Path

    tsv = Path(__file__).resolve().parents[1] / "data" / "sst2" / "test.tsv"
    rows = tsv.read_text("utf-8").splitlines()[1:]
    return [r.split("\t")[0].strip() for r in rows if r.strip()]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_checkpoint, mlflow_db_template):
    """A fresh MLflow SQLite store and BentoML home with the tiny model registered @champion."""
    with tiny_registry(tmp_path_factory, tiny_checkpoint, MODEL_NAME, "load-store",
                       template=mlflow_db_template) as store:
        yield store



def _serve(store, settings: BentoSettings, log_name: str):
    return serve_registered(store, MODEL_NAME, settings, log_name)


def test_1000_requests_at_concurrency_64(store):
    texts = _texts()
    # 1 to 4 texts per request, so the batcher merges and splits requests of different sizes
    payloads = [texts[i:i + 1 + i % 4] for i in range(400)]
    settings = BentoSettings(max_batch_size=32, max_latency_ms=10_000, max_texts=16,
                             max_concurrency=128, timeout=60.0)
    with _serve(store, settings, "server-load.log") as srv:
        result = load(f"{srv.url}/classify", payloads, requests=1000, concurrency=64,
                      time_budget_s=150.0, request_timeout_s=60.0)
        summary = result.summary()
        print(summary)
        assert result.server_errors == 0, summary
        assert result.transport_errors == 0 and result.not_sent == 0, summary
        assert result.malformed == 0, summary
        assert result.ok == 1000, summary
        metrics = httpx.get(f"{srv.url}/metrics", timeout=10).text
        # adaptive batching really merged requests: fewer model calls than requests
        calls = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                 if line.startswith("maas_classify_batch_texts_count")]
        assert calls and calls[0] < 1000


def test_overload_is_shed_with_429_or_503(store):
    texts = _texts()
    payloads = [texts[i:i + 4] for i in range(0, 200, 4)]
    settings = BentoSettings(max_batch_size=8, max_latency_ms=10_000, max_texts=8,
                             max_concurrency=2, timeout=60.0)
    with _serve(store, settings, "server-overload.log") as srv:
        result = load(f"{srv.url}/classify", payloads, requests=300, concurrency=64,
                      time_budget_s=90.0, request_timeout_s=60.0)
        summary = result.summary()
        print(summary)
        assert set(result.statuses) <= {200, 429, 503}, summary
        assert result.statuses[429] + result.statuses[503] > 0, summary
        assert result.ok > 0 and result.malformed == 0, summary
        assert result.transport_errors == 0 and result.not_sent == 0, summary
        # still healthy and serving afterwards
        assert httpx.get(f"{srv.url}/readyz", timeout=10).status_code == 200
        r = httpx.post(f"{srv.url}/classify", json={"texts": ["still here"]}, timeout=30)
        assert r.status_code == 200
