"""BentoML 1.4 service for a transformers sequence classifier imported by ``bentos.build_bento``.

This file is copied into each bento together with a ``bento_config.json`` (model tag, batching,
limits, traffic, MLflow lineage) that is read at import time, so ``bentoml serve <bento_tag>`` needs
no environment variables. It must stay self-contained: the bento holds only this file.

Endpoints:
- ``POST /classify``  ``{"texts": [str, ...]}`` ->
  ``[{"label": str, "probabilities": {label: p, ...}}, ...]`` (one entry per text, same order).
  Adaptive batching (``batchable=True``): BentoML parses and validates each client request
  against the pydantic input type *before* it enters the batcher (``api_endpoint`` ->
  ``input_spec.from_http_request`` -> ``batch_infer``), so the per-request limits below hold
  although the batcher then merges the texts of concurrent requests into model batches of at
  most ``max_batch_size`` texts (a large request is split across batches and re-assembled).
  Bad input -> 400 ``{"error": ..., "detail": [{"loc": [...], "msg": "... max_texts=64 ..."}]}``.
- ``GET /metadata`` (also ``POST /metadata``): MLflow model name/version/run/alias, bento tag,
  BentoML model tag, labels, device, dtype, quantisation, limits.
- built in: ``/livez``, ``/readyz``, ``/metrics`` (Prometheus; this service adds
  ``maas_classify_batch_texts``, the number of texts per model call).

Security: request bodies whose content type names pickle are refused with 415 on every route
(BentoML itself only refuses ``application/vnd.bentoml+pickle``, CVE-2025-27520/32375); the
model is loaded from safetensors only (``use_safetensors=True``); bodies larger than the limits
allow are refused with 413 before they are read.
"""

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Annotated, Any

import bentoml
import torch
from pydantic import BaseModel, BeforeValidator

logger = logging.getLogger("bentoml.maas.text_classifier")

CONFIG_PATH = Path(__file__).with_name("bento_config.json")
# Mirrors bentos.build.BentoSettings (this file cannot import the bentos package inside a bento).
DEFAULT_SETTINGS: dict[str, Any] = {
    "max_batch_size": 32, "max_latency_ms": 5000, "max_texts": 64, "max_chars": 2000,
    "timeout": 30.0, "max_concurrency": 64, "workers": 1, "quantize": False,
    "service_name": None, "max_tokens": None, "torch_threads": None,
}
#: refused with 415 on every route (any media type naming pickle is refused as well)
PICKLE_MEDIA_TYPES = frozenset({
    "application/vnd.bentoml+pickle", "application/x-pickle", "application/pickle",
    "application/python-pickle", "application/x-python-pickle",
})
#: media types accepted for API request bodies (a missing content type is read as JSON)
JSON_MEDIA_TYPES = frozenset({"application/json", "text/json"})


def load_config(path: Path = CONFIG_PATH) -> dict[str, Any]:
    config: dict[str, Any] = {"model_tag": None, "settings": dict(DEFAULT_SETTINGS),
                              "mlflow": {}, "labels": []}
    if path.is_file():
        data = json.loads(path.read_text("utf-8"))
        config["model_tag"] = data.get("model_tag")
        config["settings"].update(data.get("settings") or {})
        config["mlflow"] = data.get("mlflow") or {}
        config["labels"] = data.get("labels") or []
    return config


CONFIG = load_config()
SETTINGS = CONFIG["settings"]
MODEL_TAG: str | None = CONFIG["model_tag"]
MAX_TEXTS = int(SETTINGS["max_texts"])
MAX_CHARS = int(SETTINGS["max_chars"])
MAX_BATCH_SIZE = int(SETTINGS["max_batch_size"])
MAX_LATENCY_MS = int(SETTINGS["max_latency_ms"])
WORKERS = int(SETTINGS["workers"])
SERVICE_NAME = SETTINGS.get("service_name") or "TextClassifier"
# chosen once, at import time: the resources BentoML schedules and the device the model uses
HAS_CUDA = torch.cuda.is_available()
#: the largest body a valid request can have: every character JSON-escaped as a surrogate pair
#: (12 bytes), plus quotes/commas per text and some slack for the envelope and whitespace
MAX_BODY_BYTES = MAX_TEXTS * (MAX_CHARS * 12 + 8) + 64 * 1024


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _default_torch_threads() -> int:
    """Cores per worker, less one left to the event loop (HTTP, JSON, batching) when there is
    more than one core: on a small, busy CPU box, OpenMP regions spanning every core stall
    whenever one of their threads is descheduled (seen: 7 ms -> 380 ms batch-1 outliers with 2
    threads on 2 cores, none with 1)."""
    per_worker = max(1, _cpu_cores() // max(1, WORKERS))
    return per_worker - 1 if per_worker > 1 else 1


TORCH_THREADS = int(SETTINGS.get("torch_threads") or _default_torch_threads())


# -- input validation: every message names the limit it enforces ------------------------------
def _check_texts(value: Any) -> Any:
    """Runs on the parsed JSON value before the items are validated (count limits first, so an
    oversized list is refused without validating each item)."""
    if not isinstance(value, list):
        raise ValueError("texts must be a JSON array of strings")  # noqa: TRY004 (pydantic)
    if not value:
        raise ValueError(f"texts is empty: send 1 to max_texts={MAX_TEXTS} texts")
    if len(value) > MAX_TEXTS:
        raise ValueError(f"too many texts: {len(value)} > max_texts={MAX_TEXTS} per request")
    return value


def _check_text(text: Any) -> Any:
    if not isinstance(text, str):
        raise ValueError(  # noqa: TRY004 (pydantic turns ValueError into a 400)
            f"each text must be a string, got {type(text).__name__}")
    if len(text) > MAX_CHARS:
        raise ValueError(f"text too long: {len(text)} > max_chars={MAX_CHARS} characters")
    if not text.strip():
        raise ValueError("text is empty or whitespace only: at least one non-whitespace "
                         "character is required")
    return text


Text = Annotated[str, BeforeValidator(_check_text)]
Texts = Annotated[list[Text], BeforeValidator(_check_texts)]


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]




def _batch_histogram() -> Any:
    """The ``maas_classify_batch_texts`` histogram, created when a service instance starts (not at
    import: a process that imports this file twice, e.g. two builds, would register it twice)."""
    try:
        return bentoml.metrics.Histogram(
            name="maas_classify_batch_texts",
            documentation="Texts per model call of the batchable classify API (after adaptive "
                          "batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
    except ValueError:  # already registered in this process (a second in-process instance)
        logger.debug("maas_classify_batch_texts is already registered in this process")
        return None

# filled by the service instance; read by the GET /metadata route (one instance per worker)
_RUNTIME: dict[str, Any] = {}


def _media_type(scope: Any) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == b"content-type":
            return value.split(b";")[0].strip().lower().decode("latin-1")
    return None


def _content_length(scope: Any) -> int | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class RequestGuardMiddleware:
    """Refuses, before BentoML reads the body:

    - any body whose content type names pickle, on every route: 415 (BentoML 1.4 refuses only
      ``application/vnd.bentoml+pickle`` itself; other pickle spellings would otherwise reach
      its serde lookup),
    - a POST to ``/classify`` whose content type is not JSON: 415,
    - a POST body larger than any valid request can be (``Content-Length``): 413.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            error = self._refusal(scope)
            if error is not None:
                from starlette.responses import JSONResponse

                status, message = error
                await JSONResponse({"error": message}, status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _refusal(scope: Any) -> tuple[int, str] | None:
        media = _media_type(scope)
        if media is not None and (media in PICKLE_MEDIA_TYPES or "pickle" in media):
            return 415, (f"content type {media} is not accepted (pickle bodies are refused); "
                         "send application/json")
        if scope.get("method") != "POST":
            return None
        if scope.get("path", "").rstrip("/") == "/classify" and media is not None \
                and media not in JSON_MEDIA_TYPES and not media.endswith("+json"):
            return 415, f"content type {media} is not accepted; send application/json"
        length = _content_length(scope)
        if length is not None and length > MAX_BODY_BYTES:
            return 413, (f"request body of {length} bytes is larger than any valid request "
                         f"(max_texts={MAX_TEXTS} x max_chars={MAX_CHARS})")
        return None


async def _get_metadata(request: Any) -> Any:
    from starlette.responses import JSONResponse

    if "metadata" not in _RUNTIME:
        return JSONResponse({"error": "service is not ready"}, status_code=503)
    return JSONResponse(_RUNTIME["metadata"])


def _metadata_app() -> Any:
    from starlette.applications import Starlette
    from starlette.routing import Route

    return Starlette(routes=[Route("/metadata", _get_metadata, methods=["GET"])])


def _pick_device() -> tuple[torch.device, torch.dtype]:
    if HAS_CUDA:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.device("cuda"), dtype
    return torch.device("cpu"), torch.float32


def _bento_tag() -> str:
    name, version = bentoml.server_context.bento_name, bentoml.server_context.bento_version
    if name and version and version != "not available":
        return f"{name}:{version}"
    return ""


@bentoml.asgi_app(_metadata_app(), path="/", name="maas_metadata")
@bentoml.service(
    name=SERVICE_NAME,
    resources={"gpu": 1} if HAS_CUDA else {"cpu": str(TORCH_THREADS * WORKERS)},
    traffic={"timeout": float(SETTINGS["timeout"]),
             "max_concurrency": int(SETTINGS["max_concurrency"])},
    workers=WORKERS,
)
class TextClassifier:
    if MODEL_TAG:
        model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not MODEL_TAG:
            raise RuntimeError(f"no model configured ({CONFIG_PATH.name} missing): build the "
                               "bento with bentos.build_bento(...)")
        stored = self.model  # the resolved BentoML model behind the BentoModel reference
        path = stored.path
        self.device, self.dtype = _pick_device()
        if self.device.type == "cpu":
            torch.set_num_threads(TORCH_THREADS)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=self.dtype, use_safetensors=True)
        self.batch_texts = _batch_histogram()
        self.quantized = False
        if SETTINGS.get("quantize"):
            if self.device.type == "cpu":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = torch.ao.quantization.quantize_dynamic(
                        model, {torch.nn.Linear}, dtype=torch.qint8)
                self.quantized = True
            else:
                logger.warning("quantize=True ignored on %s: dynamic int8 is CPU-only; "
                               "serving in %s", self.device, self.dtype)
        self.classifier = model.to(self.device).eval()
        cfg = model.config
        self.labels = [str(cfg.id2label.get(i, f"LABEL_{i}")) for i in range(cfg.num_labels)]
        limits = [getattr(self.tokenizer, "model_max_length", None),
                  getattr(cfg, "max_position_embeddings", None), SETTINGS.get("max_tokens")]
        self.max_tokens = min(int(v) for v in limits if v and int(v) < 1_000_000)
        self.info = {
            "service": SERVICE_NAME,
            "model_name": CONFIG["mlflow"].get("mlflow_model_name", ""),
            "model_version": CONFIG["mlflow"].get("mlflow_version", ""),
            "run_id": CONFIG["mlflow"].get("mlflow_run_id", ""),
            "alias": CONFIG["mlflow"].get("alias", ""),
            "model_uri": CONFIG["mlflow"].get("model_uri", ""),
            "bento_tag": _bento_tag(),
            "bento_model_tag": str(stored.info.tag),
            "labels": self.labels,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "quantize": self.quantized,
            "torch_threads": torch.get_num_threads(),
            "max_tokens": self.max_tokens,
            "max_batch_size": MAX_BATCH_SIZE,
            "max_latency_ms": MAX_LATENCY_MS,
            "max_texts": MAX_TEXTS,
            "max_chars": MAX_CHARS,
            "max_concurrency": int(SETTINGS["max_concurrency"]),
            "timeout": float(SETTINGS["timeout"]),
            "workers": WORKERS,
            "batching": MAX_BATCH_SIZE > 1,
        }
        _RUNTIME["metadata"] = self.info
        logger.info("serving %s (MLflow %s v%s, bento %s) on device=%s dtype=%s quantized=%s "
                    "torch_threads=%d max_batch_size=%d max_latency_ms=%d",
                    self.info["bento_model_tag"], self.info["model_name"],
                    self.info["model_version"], self.info["bento_tag"] or "-", self.device,
                    self.info["dtype"], self.quantized, torch.get_num_threads(),
                    MAX_BATCH_SIZE, MAX_LATENCY_MS)

    def predict_texts(self, texts: list[str]) -> list[dict[str, Any]]:
        """One model call: tokenise the batch (padding to its longest text), softmax."""
        start = time.perf_counter()
        enc = self.tokenizer(list(texts), padding="longest", truncation=True,
                             max_length=self.max_tokens, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with torch.inference_mode():
            logits = self.classifier(**enc).logits
        probs = torch.softmax(logits.float(), dim=-1).cpu().tolist()
        if self.batch_texts is not None:
            self.batch_texts.observe(len(texts))
        logger.debug("batch of %d texts in %.1f ms", len(texts),
                     (time.perf_counter() - start) * 1000)
        out = []
        for row in probs:
            best = max(range(len(row)), key=row.__getitem__)
            out.append({"label": self.labels[best],
                        "probabilities": dict(zip(self.labels, row))})
        return out

    @bentoml.api(route="/classify", batchable=MAX_BATCH_SIZE > 1, batch_dim=0,
                 max_batch_size=max(2, MAX_BATCH_SIZE), max_latency_ms=MAX_LATENCY_MS)
    def classify(self, texts: Texts) -> list[Prediction]:
        """Classify 1 to max_texts texts: per text the top label and the softmax probability
        of every label, in input order."""
        return [Prediction(**p) for p in self.predict_texts(texts)]

    @bentoml.api(route="/metadata")
    def metadata(self) -> dict[str, Any]:
        """What is being served: MLflow lineage, bento and model tags, labels, device, limits."""
        return self.info


TextClassifier.add_asgi_middleware(RequestGuardMiddleware)
