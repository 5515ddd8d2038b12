"""BentoML 1.4 service for a text embedder imported by ``bentos.build_bento``: one compression
variant of a registered model, run by PyTorch or ONNX Runtime (``maas_runtime.py``).

Copied into each bento with ``maas_runtime.py``, ``maas_text.py`` (the text classifier's
tokenisation and ONNX session helpers), ``maas_guard.py`` and a ``bento_config.json`` read at
import time; it imports nothing from the ``bentos`` package.

Endpoints:
- ``POST /embed`` ``{"texts": [str, ...], "encoding": "float" | "base64"}`` ->
  ``{"embeddings": [[float, ...], ...], "dim": N, "normalized": bool, "encoding": ...}``, one
  vector per text in input order; ``"encoding": "base64"`` answers each vector as the base64 of
  its little-endian float32 bytes (a quarter of the JSON size for large batches). The texts of
  concurrent requests are merged into model calls of up to ``max_batch_size`` texts
  (``maas_batcher.py``), run in length-sorted forward passes (``forward_batch_size``). The
  limits and 4xx rules are the text classifier's ``/classify``: 1..max_texts non-blank
  strings of at most max_chars characters (400 naming the limit), a JSON body only (415; pickle
  refused on every route), 413 over the largest valid body, 408 for a body not received within
  ``body_timeout_s``. Unlike BentoML's adaptive batcher, no request is shed for latency (503).
- ``GET /metadata``: lineage, variant, runtime, dim, pooling, normalisation, limits.
- ``GET /card`` (``?format=json``): the version's model card.
"""

import base64
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import bentoml
from pydantic import BeforeValidator

logger = logging.getLogger("bentoml.maas.text_embedder")

CONFIG_PATH = Path(__file__).with_name("bento_config.json")
DEFAULT_SETTINGS: dict[str, Any] = {
    "max_batch_size": 32, "max_latency_ms": 5000, "max_texts": 64, "max_chars": 2000,
    "timeout": 30.0, "max_concurrency": 64, "workers": 1, "service_name": None,
    "max_tokens": None, "torch_threads": None, "forward_batch_size": None,
    "access_log": True, "body_timeout_s": 5.0,
}


def _sibling(stem: str) -> Any:
    """``<stem>.py`` from this file's folder (the bento's ``src/``), cached per service."""
    name = f"{__name__}_{stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(
            f"{stem}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


#: GET /metadata, GET /card, the bento config and service options (maas_http.py, shared by
#: every MaaS service)
http = _sibling("maas_http")
CONFIG = http.read_config(CONFIG_PATH, DEFAULT_SETTINGS)
SETTINGS = CONFIG["settings"]
MODEL_TAG: str | None = CONFIG["model_tag"]
MAX_TEXTS, MAX_CHARS = int(SETTINGS["max_texts"]), int(SETTINGS["max_chars"])
WORKERS = int(SETTINGS["workers"])
SERVICE_NAME = SETTINGS.get("service_name") or "TextEmbedder"
VARIANT: dict[str, Any] = CONFIG["variant"]
RUNTIME_NAME = VARIANT.get("runtime") or "torch"
runtimes = _sibling("maas_runtime")
guard = _sibling("maas_guard")
batching = _sibling("maas_batcher")
MAX_BATCH_SIZE = int(SETTINGS["max_batch_size"])
HAS_GPU = runtimes.text().has_gpu(RUNTIME_NAME)
THREADS = int(SETTINGS.get("torch_threads") or runtimes.text().default_threads(WORKERS))
#: the largest body a valid request can have (every character a 12-byte JSON escape)
MAX_BODY_BYTES = MAX_TEXTS * (MAX_CHARS * 12 + 8) + 64 * 1024
BODY_TIMEOUT_S = float(SETTINGS.get("body_timeout_s") or DEFAULT_SETTINGS["body_timeout_s"])


def _check_texts(value: Any) -> Any:
    if not isinstance(value, list):
        raise ValueError("texts must be a JSON array of strings")  # noqa: TRY004 (pydantic)
    if not value:
        raise ValueError(f"texts is empty: send 1 to max_texts={MAX_TEXTS} texts")
    if len(value) > MAX_TEXTS:
        raise ValueError(f"too many texts: {len(value)} > max_texts={MAX_TEXTS} per request")
    return value


def _check_text(text: Any) -> Any:
    if not isinstance(text, str):
        raise ValueError(f"each text must be a string, got {type(text).__name__}")  # noqa: TRY004
    if len(text) > MAX_CHARS:
        raise ValueError(f"text too long: {len(text)} > max_chars={MAX_CHARS} characters")
    if not text.strip():
        raise ValueError("text is empty or whitespace only: at least one non-whitespace "
                         "character is required")
    return text


Text = Annotated[str, BeforeValidator(_check_text)]
Texts = Annotated[list[Text], BeforeValidator(_check_texts)]
Answer = Annotated[dict[str, Any], bentoml.validators.ContentType("application/json")]

_RUNTIME: dict[str, Any] = {}  # filled by the service instance; read by GET /metadata


@bentoml.asgi_app(http.metadata_app(_RUNTIME, Path(__file__).parent), path="/",
                  name="maas_metadata")
@bentoml.service(**http.service_options(SERVICE_NAME, SETTINGS, THREADS, WORKERS, HAS_GPU))
class TextEmbedder:
    if MODEL_TAG:
        model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        if not MODEL_TAG:
            raise http.no_model(CONFIG_PATH)
        stored = self.model
        self.runtime = runtimes.load_runtime(VARIANT, Path(stored.path), SETTINGS, THREADS)
        mlflow_info = CONFIG["mlflow"]
        self.info = {
            "service": SERVICE_NAME, "model_name": mlflow_info.get("mlflow_model_name", ""),
            "model_version": mlflow_info.get("mlflow_version", ""),
            "run_id": mlflow_info.get("mlflow_run_id", ""),
            "alias": mlflow_info.get("alias", ""),
            "variant": VARIANT.get("name") or "fp32",
            "variant_model_uri": VARIANT.get("model_uri", ""),
            "bento_tag": http.bento_tag(), "bento_model_tag": str(stored.info.tag),
            **self.runtime.info,
            "dtype": (VARIANT.get("onnx") or {}).get("dtype") or self.runtime.info["dtype"],
            "api": {"route": "/embed", "input": "texts", "output": "embeddings",
                    "max_items": MAX_TEXTS},
            "max_texts": MAX_TEXTS, "max_chars": MAX_CHARS, "workers": WORKERS,
            "max_concurrency": int(SETTINGS["max_concurrency"]),
            "timeout": float(SETTINGS["timeout"]), "encodings": ["float", "base64"],
            "max_batch_size": MAX_BATCH_SIZE, "batching": MAX_BATCH_SIZE > 1,
        }
        self.batcher = batching.MicroBatcher(self.runtime.embed, MAX_BATCH_SIZE)
        _RUNTIME["metadata"] = self.info
        logger.info("serving %s (MLflow %s v%s) variant=%s runtime=%s dim=%s pooling=%s",
                    self.info["bento_model_tag"], self.info["model_name"],
                    self.info["model_version"], self.info["variant"], self.info["runtime"],
                    self.info["dim"], self.info["pooling"])

    @bentoml.api(route="/embed")
    async def embed(self, texts: Texts,
                    encoding: Literal["float", "base64"] = "float") -> Answer:
        """Embed 1 to max_texts texts: one vector per text, in input order (the texts of
        concurrent requests share model calls of up to max_batch_size texts)."""
        vectors = await self.batcher.embed(list(texts))
        if encoding == "base64":
            rows: list[Any] = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
                               for v in vectors]
        else:
            rows = vectors.tolist()
        return {"embeddings": rows, "dim": int(vectors.shape[1]),
                "normalized": bool(self.info["normalized"]), "encoding": encoding}

    @bentoml.api(route="/metadata")
    def metadata(self) -> dict[str, Any]:
        """What is being served: lineage, variant, runtime, dim, pooling, limits."""
        return self.info


TextEmbedder.add_asgi_middleware(http.RequestGuardMiddleware, route="/embed",
                                  max_body_bytes=MAX_BODY_BYTES,
                                  limits=f"max_texts={MAX_TEXTS} x max_chars={MAX_CHARS}")
TextEmbedder.add_asgi_middleware(guard.BodyGuardMiddleware, max_bytes=MAX_BODY_BYTES,
                                 timeout_s=BODY_TIMEOUT_S)
