"""Request-body guard for the text classifier service (copied into each bento beside
``service.py``, which loads it from its own folder; it imports nothing from the ``bentos``
package).

``BodyGuardMiddleware`` is a pure ASGI middleware. For a request that announces a body
(``Content-Length`` or ``Transfer-Encoding``) it reads the whole body *before* the app sees it:

- under one deadline for the whole body (``timeout_s`` from the first read): a client that stalls
  gets 408 and the connection is closed;
- counting the bytes of every ``http.request`` message, so chunked bodies are bounded too: as soon
  as more than ``max_bytes`` arrived it answers 413 and closes the connection without reading the
  rest;
- a client that disconnects while sending is a quiet close (one info log line and a 499 that
  only the middlewares see, which completes the request for them), not an exception that
  BentoML would log with a traceback and count as HTTP 500.

The app then gets the complete body as one message, never a truncated one. Neither uvicorn
(no body-read timeout; ``--limit-concurrency`` counts connections), Starlette nor BentoML 1.4
(``TimeoutMiddleware`` answers 504 after the whole request timeout, and
``MaxConcurrencyMiddleware`` only counts) offers a body deadline or a streamed byte limit, hence
this middleware. BentoML adds user middlewares *inside* its ``MaxConcurrencyMiddleware``, so a
request's concurrency slot is taken before this guard runs; the deadline bounds how long a slow
body holds it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

logger = logging.getLogger("bentoml.maas.text_classifier")


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class _Disconnected(Exception):
    pass


def _has_body(scope: Any) -> bool:
    for key, value in scope.get("headers") or ():
        name = key.lower()
        if name == b"transfer-encoding":
            return True
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
    return False


async def _send_refusal(send: Any, status: int, message: str) -> None:
    """A JSON error that also closes the connection (the unread rest of the body is dropped)."""
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class BodyGuardMiddleware:
    """Reads request bodies with a deadline (408) and a streamed byte limit (413); see the module
    docstring."""

    def __init__(self, app: Any, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, int(max_bytes), float(timeout_s)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not _has_body(scope):
            await self.app(scope, receive, send)
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                body = await self._read_body(receive)
        except TimeoutError:
            logger.info("%s %s: request body not received within body_timeout_s=%s s: 408",
                        scope.get("method"), scope.get("path"), self.timeout_s)
            await _send_refusal(send, 408, f"request body not received within "
                                           f"{self.timeout_s:g} s (body_timeout_s)")
            return
        except _Refused as exc:
            logger.info("%s %s: %s: %d", scope.get("method"), scope.get("path"), exc.message,
                        exc.status)
            await _send_refusal(send, exc.status, exc.message)
            return
        except _Disconnected:
            logger.info("%s %s: client disconnected while sending the request body (499)",
                        scope.get("method"), scope.get("path"))
            # nobody reads it (the server drops writes to a closed connection), but it completes
            # the response for the middlewares around this one: without it BentoML counts the
            # request as in flight for ever and `bentoml serve` ignores SIGTERM
            await _send_refusal(send, 499, "client closed the connection")
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body(self, receive: Any) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _Refused(413, f"request body is larger than {self.max_bytes} bytes, "
                                    "the largest valid request (max_texts x max_chars)")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """A ``receive`` that gives the buffered body once, then waits on the real one (for the
    disconnect event)."""
    sent = False

    async def replay() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
