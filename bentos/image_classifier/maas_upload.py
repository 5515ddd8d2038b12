"""Request handling of the image service before BentoML reads a request (copied into each image
bento beside ``service.py``; Starlette and python-multipart only, no ``bentos`` imports).

- :class:`RequestGuardMiddleware` (outermost): pickle bodies -> 415 on every route; a
  ``POST /classify`` whose content type is not JSON, ``multipart/form-data`` or one of the image
  types -> 415; a ``Content-Length`` over the largest valid body -> 413.
- :class:`UploadMiddleware` (inside ``maas_guard.BodyGuardMiddleware``, so the body is complete
  and bounded): a multipart body (files in the repeated field ``images``) or a raw image body is
  rewritten as the JSON form ``{"images": [{"name": ..., "data": <base64>}, ...]}`` that the
  ``/classify`` API validates. More than ``max_images`` files or one over ``max_image_bytes``
  -> 413; another form field, or a form value that is not a file -> 400; a file part whose
  content type is neither an image type nor ``application/octet-stream`` -> 415.
- :func:`item_bytes`: one JSON item (a base64 string, or ``{"name", "data"}``) as bytes, its size
  checked before it is decoded; a ValueError names the image.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from typing import Any

logger = logging.getLogger("bentoml.maas.image_classifier")

PICKLE_MEDIA_TYPES = frozenset({
    "application/vnd.bentoml+pickle", "application/x-pickle", "application/pickle",
    "application/python-pickle", "application/x-python-pickle",
})
JSON_MEDIA_TYPES = frozenset({"application/json", "text/json"})
IMAGE_MEDIA_TYPES = frozenset({"image/png", "image/jpeg", "image/jpg", "image/pjpeg", "image/bmp",
                               "image/x-ms-bmp", "image/webp"})
MULTIPART = "multipart/form-data"
FIELD = "images"
#: bytes per image of multipart/JSON framing allowed on top of the images themselves
ENVELOPE_BYTES = 1024


def max_body_bytes(max_images: int, max_image_bytes: int) -> int:
    """The largest valid request body: every image at its limit, base64-encoded (4/3), framed."""
    return max_images * ((max_image_bytes * 4) // 3 + 4 + ENVELOPE_BYTES) + 64 * 1024


def _header(scope: Any, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value
    return None


def media_type(scope: Any) -> str | None:
    value = _header(scope, b"content-type")
    return None if value is None else value.split(b";")[0].strip().lower().decode("latin-1")


def _is_classify(scope: Any) -> bool:
    return scope.get("method") == "POST" and scope.get("path", "").rstrip("/") == "/classify"


async def _refuse(scope: Any, receive: Any, send: Any, status: int, message: str) -> None:
    from starlette.responses import JSONResponse

    logger.info("%s %s: %s: %d", scope.get("method"), scope.get("path"), message, status)
    await JSONResponse({"error": message}, status_code=status)(scope, receive, send)


class RequestGuardMiddleware:
    """Content-type and ``Content-Length`` refusals before any body is read (see module doc)."""

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, int(max_body_bytes)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            error = self._refusal(scope)
            if error is not None:
                await _refuse(scope, receive, send, *error)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Any) -> tuple[int, str] | None:
        media = media_type(scope)
        if media is not None and (media in PICKLE_MEDIA_TYPES or "pickle" in media):
            return 415, f"content type {media} is not accepted (pickle bodies are refused)"
        if scope.get("method") != "POST":
            return None
        if _is_classify(scope) and media is not None and not (
                media in JSON_MEDIA_TYPES or media.endswith("+json") or media == MULTIPART
                or media in IMAGE_MEDIA_TYPES):
            return 415, (f"content type {media} is not accepted; send images as "
                         f"{MULTIPART} (field {FIELD!r}), a raw image/png, image/jpeg, "
                         "image/bmp or image/webp body, or application/json with base64")
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return 413, (f"request body of {int(length)} bytes is larger than any valid request "
                         f"({self.max_body_bytes} bytes: max_images x max_image_bytes)")
        return None


class _Refusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class UploadMiddleware:
    """Multipart and raw image bodies of ``POST /classify`` -> the JSON form (module doc)."""

    def __init__(self, app: Any, max_images: int, max_image_bytes: int) -> None:
        self.app, self.max_images, self.max_image_bytes = app, max_images, max_image_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        media = media_type(scope) if scope["type"] == "http" and _is_classify(scope) else None
        if media != MULTIPART and media not in IMAGE_MEDIA_TYPES:
            await self.app(scope, receive, send)
            return
        try:
            if media == MULTIPART:
                items = await self._multipart(scope, receive)
            else:
                items = [self._item("body", await _read_all(receive))]
        except _Refusal as exc:
            await _refuse(scope, receive, send, exc.status, exc.message)
            return
        body = json.dumps({FIELD: items}).encode()
        headers = [(k, v) for k, v in scope["headers"]
                   if k.lower() not in (b"content-type", b"content-length",
                                        b"transfer-encoding")]
        headers += [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())]
        await self.app({**scope, "headers": headers}, _replay(body, receive), send)

    def _item(self, name: str, data: bytes) -> dict[str, str]:
        if len(data) > self.max_image_bytes:
            raise _Refusal(413, f"image {name}: {len(data)} bytes > max_image_bytes="
                                f"{self.max_image_bytes}")
        if not data:
            raise _Refusal(400, f"image {name}: empty file")
        return {"name": name, "data": base64.b64encode(data).decode("ascii")}

    async def _multipart(self, scope: Any, receive: Any) -> list[dict[str, str]]:
        from starlette.datastructures import UploadFile
        from starlette.requests import Request

        try:
            form = await Request(scope, receive).form(max_files=self.max_images + 1,
                                                      max_fields=16)
        except Exception as exc:  # starlette's MultiPartException / HTTPException (400)
            detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or str(exc)
            if "Too many files" in str(detail):
                raise _Refusal(413, f"too many images: more than max_images="
                                    f"{self.max_images} per request") from None
            raise _Refusal(400, f"cannot parse the multipart body: {detail}") from None
        try:
            items = []
            for key, value in form.multi_items():
                if key != FIELD:
                    raise _Refusal(400, f"unexpected form field {key!r}: send the images in "
                                        f"the repeated field {FIELD!r}")
                if not isinstance(value, UploadFile):
                    raise _Refusal(400, f"form field {FIELD!r} item {len(items)} is not a file")
                name = value.filename or f"{FIELD}[{len(items)}]"
                ctype = (value.content_type or "application/octet-stream").split(";")[0].lower()
                if ctype not in IMAGE_MEDIA_TYPES and ctype != "application/octet-stream":
                    raise _Refusal(415, f"image {len(items)} ({name}): content type {ctype} is "
                                        "not an image type")
                items.append(self._item(f"{len(items)} ({name})", await value.read()))
            if len(items) > self.max_images:
                raise _Refusal(413, f"too many images: {len(items)} > max_images="
                                    f"{self.max_images} per request")
            if not items:
                raise _Refusal(400, f"no images: send files in the form field {FIELD!r}")
            return items
        finally:
            await form.close()


async def _read_all(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replay() -> Any:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def item_bytes(item: Any, index: int, max_bytes: int) -> tuple[str, bytes]:
    """(name, bytes) of one JSON item: a base64 string, or ``{"name": str, "data": base64}``
    (what :class:`UploadMiddleware` writes). The encoded length is checked before decoding."""
    name = f"{index}"
    if isinstance(item, dict):
        name = str(item.get("name") or index)[:200]
        item = item.get("data")
    if not isinstance(item, str):
        raise ValueError(f"image {name}: expected a base64 string, got {type(item).__name__}")
    if len(item) > (max_bytes * 4) // 3 + 4:
        raise ValueError(f"image {name}: more than max_image_bytes={max_bytes} bytes")
    try:
        data = base64.b64decode(item, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"image {name}: not valid base64") from None
    if not data:
        raise ValueError(f"image {name}: empty")
    return f"image {name}", data
