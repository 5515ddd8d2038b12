"""``GET /metadata`` and ``GET /card``: the endpoints every MaaS service serves beside its model
API, as one Starlette app the service mounts with ``bentoml.asgi_app``.

Copied into every bento beside ``service.py``, which loads it from its own folder (the image and
embedder service folders link to this file); it imports nothing from the ``bentos`` package.
``/metadata`` answers what the service instance put in its ``state["metadata"]`` (503 before it
is ready); ``/card`` the model card written at build time (Markdown, or ``?format=json``; 404 in a
bento built without one), with the serving bento's tag added.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
