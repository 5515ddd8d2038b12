"""``GET /metadata`` and ``GET /card``: the endpoints every MaaS service serves beside its model
API, as one Starlette app the service mounts with ``bentoml.asgi_app``.

Copied into every bento beside ``service.py``, which loads it from its own folder (the image and
embedder service folders link to this file); it imports nothing from the ``bentos`` package.
``/metadata`` answers what the service instance put in its ``state["metadata"]`` (503 before it
is ready); ``/card`` the model card written at build time (Markdown, or ``?format=json``; 404 in a
bento built without one), with the serving bento's tag added. ``RequestGuardMiddleware``: the
checks every text service makes before BentoML reads a body. ``read_config`` and
``service_options``: the bento's ``bento_config.json`` and the ``@bentoml.service`` arguments every
MaaS service derives from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_config(path: Path, defaults: dict[str, Any]) -> dict[str, Any]:
    """``bento_config.json`` (written by ``bentos.build``): model tag, settings over the
    service's ``defaults`` (a null setting keeps its default), MLflow lineage, the served
    variant, and whatever else the build wrote (labels, machine check). Without the file
    (importing the service outside a bento) the defaults and no model."""
    config: dict[str, Any] = {"model_tag": None, "settings": dict(defaults), "mlflow": {},
                              "variant": {}, "labels": [], "machine_check": {}}
    if path.is_file():
        data = json.loads(path.read_text("utf-8"))
        config["settings"].update({k: v for k, v in (data.pop("settings", None) or {}).items()
                                   if v is not None or k not in defaults})
        config.update({k: v for k, v in data.items() if v or k not in config})
    return config


def service_options(name: str, settings: dict[str, Any], threads: int, workers: int,
                    has_gpu: bool) -> dict[str, Any]:
    """The ``@bentoml.service`` arguments of a MaaS service: resources, traffic limits,
    workers, access log."""
    return {
        "name": name,
        "resources": {"gpu": 1} if has_gpu else {"cpu": str(threads * workers)},
        "traffic": {"timeout": float(settings["timeout"]),
                    "max_concurrency": int(settings["max_concurrency"])},
        "workers": workers,
        "logging": {"access": {"enabled": bool(settings.get("access_log", True))}},
    }


def no_model(config_path: Path) -> RuntimeError:
    """The error of a service started without a built bento's config."""
    return RuntimeError(f"no model configured ({config_path.name} missing): build the bento "
                        "with bentos.build_bento(...)")


def bento_tag() -> str:
    """``name:version`` of the bento being served ('' outside ``bentoml serve`` of a bento)."""
    import bentoml

    name, version = bentoml.server_context.bento_name, bentoml.server_context.bento_version
    return f"{name}:{version}" if name and version and version != "not available" else ""


def metadata_app(state: dict[str, Any], folder: Path) -> Any:
    """The Starlette app; ``state``: the service's dict holding ``"metadata"`` once ready;
    ``folder``: where ``model_card.md`` / ``model_card.json`` lie (the bento's ``src/``)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    card_md, card_json = folder / "model_card.md", folder / "model_card.json"

    async def get_metadata(request: Any) -> Any:
        if "metadata" not in state:
            return JSONResponse({"error": "service is not ready"}, status_code=503)
        return JSONResponse(state["metadata"])

    async def get_card(request: Any) -> Any:
        fmt = request.query_params.get("format", "markdown").lower()
        if fmt not in ("markdown", "md", "json"):
            return JSONResponse({"error": f"format={fmt!r}: use markdown or json"},
                                status_code=400)
        path = card_json if fmt == "json" else card_md
        if not path.is_file():
            return JSONResponse({"error": "this bento was built without a model card"},
                                status_code=404)
        tag = bento_tag()
        if fmt == "json":
            card = json.loads(path.read_text("utf-8"))
            card.setdefault("served_by", {})["bento_tag"] = tag
            return JSONResponse(card)
        text = path.read_text("utf-8").rstrip() + f"\n- Bento tag: `{tag or 'unknown'}`\n"
        return Response(text, media_type="text/markdown; charset=utf-8")

    return Starlette(routes=[Route("/metadata", get_metadata, methods=["GET"]),
                             Route("/card", get_card, methods=["GET"])])


#: refused with 415 on every route (any media type naming pickle is refused as well)
PICKLE_MEDIA_TYPES = frozenset({
    "application/vnd.bentoml+pickle", "application/x-pickle", "application/pickle",
    "application/python-pickle", "application/x-python-pickle",
})
#: media types accepted for API request bodies (a missing content type is read as JSON)
JSON_MEDIA_TYPES = frozenset({"application/json", "text/json"})


def _header(scope: Any, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.split(b";")[0].strip().lower().decode("latin-1")
    return None


class RequestGuardMiddleware:
    """Refuses, before BentoML reads the body:

    - any body whose content type names pickle, on every route: 415 (BentoML 1.4 refuses only
      ``application/vnd.bentoml+pickle`` itself; other pickle spellings would otherwise reach
      its serde lookup),
    - a POST to ``route`` whose content type is not JSON: 415,
    - a POST body larger than ``max_body_bytes`` (``Content-Length``): 413, naming ``limits``.

    Added with ``Service.add_asgi_middleware(RequestGuardMiddleware, route=..., ...)``.
    """

    def __init__(self, app: Any, *, route: str, max_body_bytes: int, limits: str) -> None:
        self.app, self.route = app, route
        self.max_body_bytes, self.limits = max_body_bytes, limits

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        error = self.refusal(scope) if scope["type"] == "http" else None
        if error is None:
            await self.app(scope, receive, send)
            return
        from starlette.responses import JSONResponse

        await JSONResponse({"error": error[1]}, status_code=error[0])(scope, receive, send)

    def refusal(self, scope: Any) -> tuple[int, str] | None:
        media = _header(scope, b"content-type")
        if media is not None and (media in PICKLE_MEDIA_TYPES or "pickle" in media):
            return 415, (f"content type {media} is not accepted (pickle bodies are refused); "
                         "send application/json")
        if scope.get("method") != "POST":
            return None
        if scope.get("path", "").rstrip("/") == self.route and media is not None \
                and media not in JSON_MEDIA_TYPES and not media.endswith("+json"):
            return 415, f"content type {media} is not accepted; send application/json"
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return 413, (f"request body of {length} bytes is larger than any valid request "
                         f"({self.limits})")
        return None
