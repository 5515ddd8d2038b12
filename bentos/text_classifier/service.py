"""BentoML 1.4 service for a text classifier imported by ``bentos.build_bento``: one compression
variant of a registered model, run by PyTorch or ONNX Runtime (``maas_runtime.py``).

This file is copied into each bento together with ``maas_runtime.py`` (the model runtimes, loaded
from this file's folder) and a ``bento_config.json`` (model tag, variant, batching, limits,
traffic, MLflow lineage) that is read at import time, so ``bentoml serve <bento_tag>`` needs no
environment variables. Neither file imports the ``bentos`` package.

Endpoints:
- ``POST /classify``  ``{"texts": [str, ...]}`` ->
  ``[{"label": str, "probabilities": {label: p, ...}}, ...]`` (one entry per text, same order).
  Adaptive batching (``batchable=True``): BentoML parses and validates each client request
  against the pydantic input type *before* it enters the batcher (``api_endpoint`` ->
  ``input_spec.from_http_request`` -> ``batch_infer``), so the per-request limits below hold
  although the batcher then merges the texts of concurrent requests into model batches of at
  most ``max_batch_size`` texts (a large request is split across batches and re-assembled).
  Bad input -> 400 ``{"error": ..., "detail": [{"loc": [...], "msg": "... max_texts=64 ..."}]}``.
- ``GET /metadata`` (also ``POST /metadata``): MLflow model name/version/run/alias, the variant
  and its runtime, bento tag, BentoML model tag, labels, device, dtype, threads, limits.
- ``GET /card``: the registered version's model card (``model_card.md`` beside this file,
  ``text/markdown``) ending with what this bento serves, its limits and its bento tag;
  ``GET /card?format=json`` gives the card's JSON form (``model_card.json``) with ``served_by``.
- built in: ``/livez``, ``/readyz``, ``/metrics`` (Prometheus; this service adds
  ``maas_classify_batch_texts``, the number of texts per model call).

Security: request bodies whose content type names pickle are refused with 415 on every route
(BentoML itself only refuses ``application/vnd.bentoml+pickle``, CVE-2025-27520/32375); the
model is loaded from safetensors (``use_safetensors=True``) or a single-file ONNX graph only;
bodies larger than the limits allow are refused with 413 before they are read
(``Content-Length``) or as soon as more arrived (chunked bodies), and a body not received within
``body_timeout_s`` gets 408 (``maas_guard.py``, also copied into each bento).
"""

import importlib.util
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import bentoml
from pydantic import BaseModel, BeforeValidator

logger = logging.getLogger("bentoml.maas.text_classifier")

CONFIG_PATH = Path(__file__).with_name("bento_config.json")
# Mirrors bentos.build.BentoSettings (this file cannot import the bentos package inside a bento).
DEFAULT_SETTINGS: dict[str, Any] = {
    "max_batch_size": 32, "max_latency_ms": 5000, "max_texts": 64, "max_chars": 2000,
    "timeout": 30.0, "max_concurrency": 64, "workers": 1, "quantize": False,
    "service_name": None, "max_tokens": None, "torch_threads": None, "variant": None,
    "forward_batch_size": None, "access_log": True, "body_timeout_s": 5.0,
}


def _sibling(stem: str) -> Any:
    """``<stem>.py`` (``maas_runtime``, ``maas_guard``) from this file's folder (the bento's
    ``src/``), whatever ``sys.path`` holds, cached per service module."""
    name = f"{__name__}_{stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).with_name(f"{stem}.py"))
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
MAX_TEXTS = int(SETTINGS["max_texts"])
MAX_CHARS = int(SETTINGS["max_chars"])
MAX_BATCH_SIZE = int(SETTINGS["max_batch_size"])
MAX_LATENCY_MS = int(SETTINGS["max_latency_ms"])
WORKERS = int(SETTINGS["workers"])
SERVICE_NAME = SETTINGS.get("service_name") or "TextClassifier"
VARIANT: dict[str, Any] = CONFIG["variant"]
VARIANT_NAME = VARIANT.get("name") or "fp32"
RUNTIME_NAME = VARIANT.get("runtime") or "torch"
runtimes = _sibling("maas_runtime")
guard = _sibling("maas_guard")
#: the CPU description and variant re-check (absent from bentos built before it: no check)
machine = (_sibling("maas_machine")
           if Path(__file__).with_name("maas_machine.py").is_file() else None)
# chosen once, at import time: the resources BentoML schedules and the device the model uses
HAS_GPU = runtimes.has_gpu(RUNTIME_NAME)
HAS_CUDA = HAS_GPU  # the name older callers use
#: the largest body a valid request can have: every character JSON-escaped as a surrogate pair
#: (12 bytes), plus quotes/commas per text and some slack for the envelope and whitespace
MAX_BODY_BYTES = MAX_TEXTS * (MAX_CHARS * 12 + 8) + 64 * 1024
#: seconds to receive a whole request body (then 408); bounds how long a slow body holds a slot
BODY_TIMEOUT_S = float(SETTINGS.get("body_timeout_s") or DEFAULT_SETTINGS["body_timeout_s"])


#: model runtime CPU threads per worker (torch or ONNX Runtime intra-op)
THREADS = int(SETTINGS.get("torch_threads") or runtimes.default_threads(WORKERS))
TORCH_THREADS = THREADS  # the name older callers use


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


#: the declared content type spares BentoML deriving it from the output model's JSON schema on
#: every response (a quarter of the event loop's time at concurrency 32, measured with py-spy)
Predictions = Annotated[list[Prediction], bentoml.validators.ContentType("application/json")]


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

def _served_runtime(model_dir: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(runtime, its variant, the machine check): the bento's variant, or, on a CPU whose
    features differ from the one it was chosen on, the fastest of the variants within budget the
    bento carries, timed here (``maas_machine.choose``; the log and ``/metadata`` say so)."""
    def loader(variant: dict[str, Any], folder: str | None) -> Any:
        path = model_dir / folder if folder else model_dir
        return lambda: runtimes.load_runtime(variant, path, SETTINGS, CONFIG["labels"], THREADS)

    if machine is None:
        return loader(VARIANT, None)(), VARIANT, {"status": "bento without a machine check"}
    return machine.choose(CONFIG.get("machine_check") or {}, VARIANT, loader,
                          key=f"{MODEL_TAG}-{os.getppid()}")


# filled by the service instance; read by the GET /metadata route (one instance per worker)
_RUNTIME: dict[str, Any] = {}


@bentoml.asgi_app(http.metadata_app(_RUNTIME, Path(__file__).parent), path="/",
                  name="maas_metadata")
@bentoml.service(**http.service_options(SERVICE_NAME, SETTINGS, THREADS, WORKERS, HAS_GPU))
class TextClassifier:
    if MODEL_TAG:
        model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        if not MODEL_TAG:
            raise http.no_model(CONFIG_PATH)
        stored = self.model  # the resolved BentoML model behind the BentoModel reference
        self.runtime, self.variant, self.machine_check = _served_runtime(Path(stored.path))
        self.labels = self.runtime.labels
        self.max_tokens = self.runtime.max_tokens
        self.batch_texts = _batch_histogram()
        self.info = self._describe(str(stored.info.tag))
        _RUNTIME["metadata"] = self.info
        logger.info("serving %s (MLflow %s v%s, bento %s) variant=%s runtime=%s device=%s "
                    "dtype=%s threads=%s providers=%s max_batch_size=%d max_latency_ms=%d "
                    "workers=%d", self.info["bento_model_tag"], self.info["model_name"],
                    self.info["model_version"], self.info["bento_tag"] or "-",
                    self.info["variant"], self.info["runtime"], self.info["device"],
                    self.info["dtype"], self.info["threads"], self.info["providers"],
                    MAX_BATCH_SIZE, MAX_LATENCY_MS, WORKERS)

    # the torch path's attributes, for callers of the in-process service (tests, benchmark)
    device = property(lambda self: getattr(self.runtime, "device", None))
    dtype = property(lambda self: getattr(self.runtime, "dtype", None))
    quantized = property(lambda self: bool(self.runtime.info["quantize"]))
    classifier = property(lambda self: getattr(self.runtime, "model", None))

    def _describe(self, bento_model_tag: str) -> dict[str, Any]:
        mlflow_info = CONFIG["mlflow"]
        return {
            "service": SERVICE_NAME,
            "model_name": mlflow_info.get("mlflow_model_name", ""),
            "model_version": mlflow_info.get("mlflow_version", ""),
            "run_id": mlflow_info.get("mlflow_run_id", ""),
            "alias": mlflow_info.get("alias", ""),
            "model_uri": mlflow_info.get("model_uri", ""),
            "variant": self.variant.get("name") or VARIANT_NAME,
            "variant_model_uri": self.variant.get("model_uri", ""),
            "variant_run_id": self.variant.get("run_id") or "",
            "variant_accuracy": self.variant.get("accuracy"),
            "variant_accuracy_drop": self.variant.get("accuracy_drop"),
            "machine": self.machine_check.get("machine"),
            "machine_check": self.machine_check,
            "bento_tag": http.bento_tag(),
            "bento_model_tag": bento_model_tag,
            "labels": self.labels,
            **self.runtime.info,
            "max_batch_size": MAX_BATCH_SIZE,
            "max_latency_ms": MAX_LATENCY_MS,
            "max_texts": MAX_TEXTS,
            "max_chars": MAX_CHARS,
            "api": {"route": "/classify", "input": "texts", "max_items": MAX_TEXTS},
            "max_concurrency": int(SETTINGS["max_concurrency"]),
            "timeout": float(SETTINGS["timeout"]),
            "workers": WORKERS,
            "batching": MAX_BATCH_SIZE > 1,
        }

    def predict_texts(self, texts: list[str]) -> list[dict[str, Any]]:
        """One model call: tokenise the batch (padding to its longest text), softmax."""
        start = time.perf_counter()
        probs = self.runtime.probabilities(list(texts))
        if self.batch_texts is not None:
            self.batch_texts.observe(len(texts))
        logger.debug("batch of %d texts in %.1f ms", len(texts),
                     (time.perf_counter() - start) * 1000)
        out = []
        for row in probs:
            best = max(range(len(row)), key=row.__getitem__)
            out.append({"label": self.labels[best],
                        "probabilities": dict(zip(self.labels, row, strict=True))})
        return out

    @bentoml.api(route="/classify", batchable=MAX_BATCH_SIZE > 1, batch_dim=0,
                 max_batch_size=max(2, MAX_BATCH_SIZE), max_latency_ms=MAX_LATENCY_MS)
    def classify(self, texts: Texts) -> Predictions:
        """Classify 1 to max_texts texts: per text the top label and the softmax probability
        of every label, in input order."""
        return [Prediction(**p) for p in self.predict_texts(texts)]

    @bentoml.api(route="/metadata")
    def metadata(self) -> dict[str, Any]:
        """What is being served: MLflow lineage, bento and model tags, labels, device, limits."""
        return self.info


TextClassifier.add_asgi_middleware(http.RequestGuardMiddleware, route="/classify",
                                    max_body_bytes=MAX_BODY_BYTES,
                                    limits=f"max_texts={MAX_TEXTS} x max_chars={MAX_CHARS}")
# added after, so it runs inside RequestGuardMiddleware: 415s and Content-Length 413s come first
TextClassifier.add_asgi_middleware(guard.BodyGuardMiddleware, max_bytes=MAX_BODY_BYTES,
                                   timeout_s=BODY_TIMEOUT_S)
