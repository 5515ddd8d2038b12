"""Receiver of MLflow model-registry alias webhooks: rebuild the bento when ``champion`` moves.

An MLflow tracking server (>= 3.3, SQL backend) POSTs one JSON body per registry event to every
active webhook subscribed to it (``bentos.webhook_register`` subscribes one per model). For
``model_version_alias`` events the body is
``{"entity": "model_version_alias", "action": "created"|"deleted", "timestamp": ISO-8601,
"data": {"name": NAME, "alias": ALIAS, "version": V}}`` (no ``version`` when deleted) with headers
``X-MLflow-Delivery-Id`` (a UUID per delivery; MLflow's own retries re-send the same request),
``X-MLflow-Timestamp`` (unix seconds) and ``X-MLflow-Signature`` = ``v1,`` + base64 of
HMAC-SHA256(secret, ``f"{delivery_id}.{timestamp}."`` + body bytes).

:func:`verify` checks a delivery (pure: headers, body, clock and the delivery ids seen so far in);
:func:`route` decides what an event asks for (pure); :class:`Rebuilder`
(``bentos/webhook_rebuild.py``) runs the builds, one at a time, in one background thread;
:func:`create_app` is the Starlette app (``POST /webhook``, ``GET /status``) and :func:`serve`
runs it with uvicorn. Whatever a delivery claims, the build is
always of the *current* ``models:/NAME@champion`` (the payload's version is never trusted to pick
what is served), and a model whose champion is the version this receiver built last is not built
again, so a duplicate event (new delivery id) builds nothing and a replay at worst wastes nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from typing import Any

from bentos.webhook_rebuild import CHAMPION, Rebuilder, mlflow_rebuilder

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"
ALIAS_ENTITY = "model_version_alias"
DEFAULT_WINDOW_S = 300
MAX_BODY_BYTES = 64 * 1024
_DELIVERY_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


# --------------------------------------------------------------------------------------------
# Pure decisions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """The outcome of :func:`verify`: ``ok``, else the HTTP status to answer and why."""

    ok: bool
    status: int
    reason: str
    delivery_id: str | None = None
    timestamp: int | None = None


def sign(secret: str, delivery_id: str, timestamp: str | int, body: bytes) -> str:
    """The ``X-MLflow-Signature`` value MLflow sends for this delivery (``v1,<base64>``)."""
    mac = hmac.new(secret.encode("utf-8"), f"{delivery_id}.{timestamp}.".encode() + body,
                   hashlib.sha256)
    return f"{SIGNATURE_VERSION},{base64.b64encode(mac.digest()).decode('ascii')}"


def verify(secret: str, headers: Mapping[str, str], body: bytes, now: float,
           window_s: float = DEFAULT_WINDOW_S, seen: Container[str] = ()) -> Verdict:
    """Check one delivery: headers present and well formed (else 400), an HMAC signature over
    ``delivery_id.timestamp.body`` that matches (compared in constant time; else 401), a timestamp
    within ``window_s`` of ``now`` either way (else 401), and a delivery id not in ``seen``
    (else 409: a replay). The caller records the id as seen when the verdict is ok."""
    if not secret:
        raise ValueError("verify: the webhook secret is empty")
    h = {str(k).lower(): v for k, v in headers.items()}
    missing = [n for n in (DELIVERY_ID_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)
               if not h.get(n.lower())]
    if missing:
        return Verdict(False, 400, f"missing header {', '.join(missing)}")
    delivery_id, raw_ts = h[DELIVERY_ID_HEADER.lower()], h[TIMESTAMP_HEADER.lower()]
    if not _DELIVERY_ID.match(delivery_id):
        return Verdict(False, 400, f"malformed {DELIVERY_ID_HEADER}")
    if not raw_ts.isascii() or not raw_ts.isdigit() or len(raw_ts) > 12:
        return Verdict(False, 400, f"malformed {TIMESTAMP_HEADER} (expected unix seconds)")
    expected = sign(secret, delivery_id, raw_ts, body).encode("ascii")
    offered = [s.strip().encode("utf-8", "replace")
               for s in h[SIGNATURE_HEADER.lower()].split(" ") if s.strip()]
    # every offered signature is compared (no early exit that would time the match)
    matched = [hmac.compare_digest(expected, s) for s in offered]
    ts = int(raw_ts)
    if not any(matched):
        return Verdict(False, 401, "bad signature", delivery_id, ts)
    if now - ts > window_s:
        return Verdict(False, 401,
                       f"stale timestamp ({now - ts:.0f} s old, window {window_s:g} s)",
                       delivery_id, ts)
    if ts - now > window_s:
        return Verdict(False, 401, f"timestamp {ts - now:.0f} s in the future "
                                   f"(window {window_s:g} s)", delivery_id, ts)
    if delivery_id in seen:
        return Verdict(False, 409, "replayed delivery id", delivery_id, ts)
    return Verdict(True, 200, "ok", delivery_id, ts)


@dataclass(frozen=True)
class Route:
    """What a verified event asks for: ``build`` (champion set/moved), ``forget`` (champion
    deleted) or ``ignore`` (another entity, alias or model), with the reason."""

    action: str
    reason: str
    name: str | None = None
    version: str | None = None


def parse_event(body: bytes) -> dict[str, Any]:
    """The JSON object of a delivery; ``ValueError`` naming the field when it is malformed."""
    try:
        event = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"body is not JSON: {exc}") from None
    # ValueError throughout: the receiver answers every malformed body with 400 naming the field
    if not isinstance(event, dict):
        raise ValueError("body: expected a JSON object")  # noqa: TRY004
    for key in ("entity", "action"):
        if not isinstance(event.get(key), str):
            raise ValueError(f"body.{key}: expected a string")  # noqa: TRY004
    if not isinstance(event.get("data"), dict):
        raise ValueError("body.data: expected an object")  # noqa: TRY004
    return event


def route(event: Mapping[str, Any], *, webhook_model: str | None = None,
          models: Container[str] | None = None, alias: str = CHAMPION) -> Route:
    """Decide what a parsed event means for this receiver. ``webhook_model``: the model named in
    the webhook URL's ``model`` query parameter (MLflow webhooks are registry-wide, so each
    model's webhook also carries the other models' events); ``models``: the models this receiver
    serves (None: all)."""
    entity, action, data = event["entity"], event["action"], event["data"]
    if entity != ALIAS_ENTITY:
        return Route("ignore", f"not an alias event ({entity}.{action})")
    name, got_alias = data.get("name"), data.get("alias")
    for key, value in (("name", name), ("alias", got_alias)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"body.data.{key}: expected a non-empty string")
    if webhook_model is not None and name != webhook_model:
        return Route("ignore", f"event for model {name!r}, this webhook is for "
                               f"{webhook_model!r}", name)
    if models is not None and name not in models:
        return Route("ignore", f"model {name!r} is not served by this receiver", name)
    if got_alias != alias:
        return Route("ignore", f"alias {got_alias!r} is not {alias!r}", name)
    if action == "deleted":
        return Route("forget", f"{name}@{alias} was deleted; nothing to build", name)
    if action != "created":
        return Route("ignore", f"alias action {action!r}", name)
    version = data.get("version")
    if not isinstance(version, str) or not version.isdigit():
        raise ValueError("body.data.version: expected a version number string")
    return Route("build", f"{name}@{alias} -> version {version}", name, version)


class SeenDeliveries:
    """Delivery ids accepted within the timestamp window (older ones fail the window check
    anyway, so they are dropped); at most ``max_ids``, oldest dropped first."""

    def __init__(self, window_s: float, max_ids: int = 100_000):
        self._ttl, self._max = 2 * window_s, max_ids
        self._ids: dict[str, float] = {}
        self._lock = threading.Lock()

    def __contains__(self, delivery_id: object) -> bool:
        with self._lock:
            return delivery_id in self._ids

    def add(self, delivery_id: str, now: float) -> None:
        with self._lock:
            self._ids[delivery_id] = now
            # insertion order is time order: drop expired ids (and any over the cap) from the front
            while self._ids:
                oldest, at = next(iter(self._ids.items()))
                if now - at <= self._ttl and len(self._ids) <= self._max:
                    break
                del self._ids[oldest]


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


def handle_delivery(secret: str, headers: Mapping[str, str], body: bytes, now: float, *,
                    window_s: float, seen: SeenDeliveries, rebuilder: Rebuilder,
                    webhook_model: str | None = None, models: Container[str] | None = None,
                    ) -> tuple[int, str, str | None, str | None]:
    """Verify, route and act on one delivery: (HTTP status, reason, delivery id, model queued).
    Not thread-safe against itself for one ``seen`` (the app calls it from its event loop)."""
    if len(body) > MAX_BODY_BYTES:
        return 413, f"body over {MAX_BODY_BYTES} bytes", None, None
    verdict = verify(secret, headers, body, now, window_s, seen)
    if not verdict.ok:
        return verdict.status, verdict.reason, verdict.delivery_id, None
    seen.add(verdict.delivery_id, now)
    try:
        decision = route(parse_event(body), webhook_model=webhook_model, models=models)
    except ValueError as exc:
        return 400, str(exc), verdict.delivery_id, None
    if decision.action == "build":
        rebuilder.request(decision.name)
        return 202, f"{decision.reason}: rebuild queued", verdict.delivery_id, decision.name
    if decision.action == "forget":
        rebuilder.forget(decision.name)
    return 200, decision.reason, verdict.delivery_id, None


def create_app(secret: str, rebuilder: Rebuilder, *, window_s: float = DEFAULT_WINDOW_S,
               models: Container[str] | None = None, clock: Callable[[], float] = time.time):
    """The Starlette app: ``POST /webhook`` (MLflow deliveries; ``?model=NAME`` restricts it to
    one model) and ``GET /status`` (builds, failures, pending; no secrets). Starts and stops
    ``rebuilder`` with the app."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route as HttpRoute

    if not secret:
        raise ValueError("the webhook secret is empty")
    seen = SeenDeliveries(window_s)
    counts = {"accepted": 0, "rejected": 0}

    def answer(status: int, reason: str, delivery_id: str | None, **extra: Any) -> JSONResponse:
        counts["accepted" if status < 400 else "rejected"] += 1
        log = logger.warning if status >= 400 else logger.info
        log("webhook delivery %s: %d %s", delivery_id or "-", status, reason)
        return JSONResponse({"status": status, "reason": reason, **extra}, status_code=status)

    async def receive(request: Request) -> JSONResponse:
        declared = request.headers.get("content-length", "0")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return answer(413, f"body over {MAX_BODY_BYTES} bytes", None)
        status, reason, delivery_id, model = handle_delivery(
            secret, request.headers, await request.body(), clock(), window_s=window_s,
            seen=seen, rebuilder=rebuilder, webhook_model=request.query_params.get("model"),
            models=models)
        return answer(status, reason, delivery_id, **({"model": model} if model else {}))

    async def status(request: Request) -> JSONResponse:
        return JSONResponse({**rebuilder.status(), "deliveries": dict(counts)})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        rebuilder.start()
        try:
            yield
        finally:
            rebuilder.stop()

    return Starlette(routes=[HttpRoute("/webhook", receive, methods=["POST"]),
                             HttpRoute("/status", status, methods=["GET"])],
                     lifespan=lifespan)


def serve(secret: str, *, host: str = "127.0.0.1", port: int = 8642,
          window_s: float = DEFAULT_WINDOW_S, settings: Any = None,
          models: Container[str] | None = None) -> None:
    """Run the receiver with uvicorn until interrupted (logs go to the root logger)."""
    import uvicorn

    app = create_app(secret, mlflow_rebuilder(settings), window_s=window_s, models=models)
    logger.info("webhook receiver on http://%s:%d/webhook (window %g s)", host, port, window_s)
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False)
