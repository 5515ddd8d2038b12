"""A small, bounded HTTP load generator (aiohttp) for a running classifier server.

Used by ``benchmarks/serving.py`` and the load tests. Every run is bounded in request count and
in wall time, sends traffic only to the URL it is given (meant for 127.0.0.1), and stops by
itself. ``LoadResult`` keeps per-status counts, latencies, a few error samples, and the CPU
seconds the generator itself used (it shares the machine with the server it measures).

It is kept cheap, because it shares the cores with the server it measures: aiohttp's client
(its HTTP parser is compiled), one keep-alive connection per concurrent worker, request bodies
encoded once up front, responses checked with a plain ``json.loads``. Side by side against a
2-worker text bento at concurrency 32 (800 requests of one text, twice), httpx's async client
spent 3.1-3.5 ms of CPU per request (0.8 of the 2 cores) and aiohttp's 0.26-0.27 ms (0.11):
with httpx the generator, not the server, set the served rate (224-255 vs 400-463 requests/s).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: seconds an idle client connection is reused; below the server's keep-alive timeout (5 s)
CLIENT_KEEPALIVE_S = 2.0


@dataclass
class LoadResult:
    url: str
    requests: int
    concurrency: int
    wall_s: float
    statuses: Counter = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)  # successful (2xx) requests only
    texts_ok: int = 0
    malformed: int = 0  # 2xx whose body failed the response check
    transport_errors: int = 0  # no HTTP response at all (connection reset, client timeout)
    not_sent: int = 0  # left unsent when the time budget ran out
    error_samples: list[str] = field(default_factory=list)
    cpu_s: float = 0.0  # CPU seconds (user + system) of the generator's process during the run

    @property
    def ok(self) -> int:
        return sum(n for s, n in self.statuses.items() if 200 <= s < 300)

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500)

    @property
    def throughput_rps(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0

    @property
    def texts_per_s(self) -> float:
        return self.texts_ok / self.wall_s if self.wall_s else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        data = sorted(self.latencies_ms)
        k = min(len(data) - 1, max(0, round(q / 100 * (len(data) - 1))))
        return data[k]

    def summary(self) -> dict[str, Any]:
        return {
            "url": self.url, "requests": self.requests, "concurrency": self.concurrency,
            "wall_s": round(self.wall_s, 3), "ok": self.ok,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "server_errors": self.server_errors, "malformed": self.malformed,
            "transport_errors": self.transport_errors, "not_sent": self.not_sent,
            "throughput_rps": round(self.throughput_rps, 2),
            "texts_per_s": round(self.texts_per_s, 2),
            "p50_ms": round(self.percentile(50), 2), "p90_ms": round(self.percentile(90), 2),
            "p99_ms": round(self.percentile(99), 2),
            "loadgen_cpu_s": round(self.cpu_s, 3),
            "loadgen_cores": round(self.cpu_s / self.wall_s, 3) if self.wall_s else 0.0,
            "error_samples": self.error_samples[:5],
        }


def check_classify_response(texts: Sequence[str], body: Any) -> str | None:
    """None when ``body`` is a well-formed /classify answer for ``texts``, else the reason."""
    if not isinstance(body, list) or len(body) != len(texts):
        return f"expected a list of {len(texts)} predictions, got {str(body)[:200]}"
    for item in body:
        if not isinstance(item, dict) or set(item) != {"label", "probabilities"}:
            return f"bad prediction {str(item)[:200]}"
        probs = item["probabilities"]
        if not isinstance(probs, dict) or item["label"] not in probs:
            return f"label not among probabilities: {str(item)[:200]}"
        if abs(sum(probs.values()) - 1.0) > 1e-3:
            return f"probabilities do not sum to 1: {probs}"
        if max(probs, key=probs.get) != item["label"] and \
                probs[item["label"]] < max(probs.values()) - 1e-6:
            return f"label is not the most probable: {item}"
    return None


def json_texts(texts: Sequence[str]) -> tuple[bytes, str]:
    """The default request body: ``{"texts": [...]}`` as JSON."""
    return json.dumps({"texts": list(texts)}).encode(), "application/json"


async def run_load(url: str, payloads: Sequence[Sequence[str]], *, requests: int,
                   concurrency: int, time_budget_s: float = 60.0,
                   request_timeout_s: float = 30.0,
                   check: Callable[[Sequence[str], Any], str | None] | None =
                   check_classify_response,
                   encode: Callable[[Sequence[Any]], tuple[bytes, str]] | None = None,
                   ) -> LoadResult:
    """POST ``{"texts": payloads[i % len(payloads)]}`` to ``url`` ``requests`` times with at
    most ``concurrency`` requests in flight; stop sending once ``time_budget_s`` has passed.
    ``encode(payload) -> (body, content type)`` sends other bodies (e.g. a multipart upload of
    images; each payload item then counts as one text)."""
    import aiohttp

    if requests < 1 or concurrency < 1:
        raise ValueError("requests and concurrency must be >= 1")
    result = LoadResult(url=url, requests=requests, concurrency=concurrency, wall_s=0.0)
    counter = iter(range(requests))
    # idle connections expire on this side first: uvicorn (bentoml serve) closes a connection
    # idle for 5 s, and a request sent on it as it closes fails (a CPU-starved load generator
    # can leave connections idle that long)
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=CLIENT_KEEPALIVE_S)
    timeout = aiohttp.ClientTimeout(total=request_timeout_s,
                                    connect=min(10.0, request_timeout_s))
    bodies = [(encode or json_texts)(texts) for texts in payloads]
    cpu0, start = time.process_time(), time.perf_counter()
    deadline = start + time_budget_s

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        texts = payloads[i % len(payloads)]
        body, ctype = bodies[i % len(bodies)]
        t0 = time.perf_counter()
        try:
            async with session.post(url, data=body, headers={"content-type": ctype}) as resp:
                status, content = resp.status, await resp.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            result.transport_errors += 1
            if len(result.error_samples) < 10:
                result.error_samples.append(f"{type(exc).__name__}: {exc}")
            return
        result.statuses[status] += 1
        if 200 <= status < 300:
            result.latencies_ms.append((time.perf_counter() - t0) * 1000)
            _check(result, check, texts, content)
        elif len(result.error_samples) < 10:
            result.error_samples.append(f"{status}: {content[:200].decode(errors='replace')}")

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                result.not_sent += 1
                continue
            await one(session, i)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(min(concurrency, requests))))
    result.wall_s = time.perf_counter() - start
    result.cpu_s = time.process_time() - cpu0
    return result


def _check(result: LoadResult, check, texts: Sequence[str], content: bytes) -> None:
    """Count a 2xx answer as ``texts_ok`` or, when ``check`` finds a problem, as malformed."""
    problem = None
    if check is not None:
        try:
            problem = check(texts, json.loads(content))
        except ValueError as exc:
            problem = f"invalid JSON: {exc}"
    if problem:
        result.malformed += 1
        if len(result.error_samples) < 10:
            result.error_samples.append(problem)
    else:
        result.texts_ok += len(texts)


def load(url: str, payloads: Sequence[Sequence[str]], **kwargs: Any) -> LoadResult:
    """Synchronous wrapper around :func:`run_load`."""
    return asyncio.run(run_load(url, payloads, **kwargs))


def as_dict(result: LoadResult) -> dict[str, Any]:
    return dataclasses.asdict(result) | result.summary()
