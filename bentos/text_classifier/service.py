"""BentoML 1.4 service for a transformers sequence classifier imported by ``bentos.build_bento``.

This file is copied into each bento together with a ``bento_config.json`` (model tag, batching,
limits, traffic, MLflow lineage) that is read at import time, so ``bentoml serve <bento_tag>`` needs
no environment variables. It must stay self-contained: the bento holds only this file.

Endpoints (all BentoML APIs are POST):
- ``POST /predict``  ``{"texts": [str, ...]}`` -> ``[{"label": str, "probabilities": {label: p}}]``.
  Adaptive batching (``batchable=True``): BentoML validates each client request against the
  pydantic input type *before* it enters the batcher (so empty lists, too many texts, non-strings,
  blank or over-long texts are answered 400 per request) and then merges the texts of concurrent
  requests into model batches of at most ``max_batch_size`` texts.
- ``POST /metadata`` (and ``GET /metadata``): model name, MLflow version/run/alias, bento model
  tag, labels, device, dtype, quantisation, batching settings.
- built in: ``/livez``, ``/readyz``, ``/metrics`` (Prometheus; this service adds
  ``maas_predict_batch_texts``, the number of texts per model call).
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
from pydantic import AfterValidator, BaseModel, Field, StringConstraints

logger = logging.getLogger("bentoml.maas.text_classifier")

CONFIG_PATH = Path(__file__).with_name("bento_config.json")
# Mirrors bentos.build.BentoSettings (this file cannot import the bentos package inside a bento).
DEFAULT_SETTINGS: dict[str, Any] = {
    "max_batch_size": 32, "max_latency_ms": 200, "max_texts": 64, "max_chars": 2000,
    "timeout": 30.0, "max_concurrency": 64, "workers": 1, "quantize": False,
    "service_name": None, "max_tokens": None, "torch_threads": None,
}
PICKLE_MEDIA_TYPE = "application/vnd.bentoml+pickle"


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
HAS_CUDA = torch.cuda.is_available()


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


TORCH_THREADS = int(SETTINGS.get("torch_threads") or max(1, _cpu_cores() // max(1, WORKERS)))


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("text must contain at least one non-whitespace character")
    return text


Text = Annotated[str, StringConstraints(min_length=1, max_length=MAX_CHARS),
                 AfterValidator(_not_blank)]
Texts = Annotated[list[Text], Field(
    min_length=1, max_length=MAX_TEXTS,
    description=f"1 to {MAX_TEXTS} non-blank texts of at most {MAX_CHARS} characters each")]


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]


BATCH_TEXTS = bentoml.metrics.Histogram(
    name="maas_predict_batch_texts",
    documentation="Texts per model call of the batchable predict API (after adaptive batching)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)

# filled by the service instance; read by the GET /metadata route (one instance per worker)
_RUNTIME: dict[str, Any] = {}


class RefusePickleMiddleware:
    """Refuse ``application/vnd.bentoml+pickle`` request bodies on every route with 415.

    BentoML 1.4 already refuses them on the entry service's APIs (also 415); this keeps the
    refusal if the service is ever composed behind another one, and answers plain JSON."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            for key, value in scope.get("headers") or ():
                if key.lower() == b"content-type" and \
                        value.split(b";")[0].strip().lower() == PICKLE_MEDIA_TYPE.encode():
                    from starlette.responses import JSONResponse

                    response = JSONResponse(
                        {"error": f"content type {PICKLE_MEDIA_TYPE} is not accepted; "
                                  "send application/json"}, status_code=415)
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


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


@bentoml.asgi_app(_metadata_app(), path="/", name="maas_metadata")
@bentoml.service(
    name=SETTINGS.get("service_name") or "TextClassifier",
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
        stored = self.model  # resolved bentoml Model (the BentoModel reference)
        path = stored.path
        self.device, self.dtype = _pick_device()
        if self.device.type == "cpu":
            torch.set_num_threads(TORCH_THREADS)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=self.dtype)
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
        info = stored.info
        self.info = {
            "service": SETTINGS.get("service_name") or "TextClassifier",
            "model_name": CONFIG["mlflow"].get("mlflow_model_name", ""),
            "mlflow_version": CONFIG["mlflow"].get("mlflow_version", ""),
            "run_id": CONFIG["mlflow"].get("mlflow_run_id", ""),
            "alias": CONFIG["mlflow"].get("alias", ""),
            "model_uri": CONFIG["mlflow"].get("model_uri", ""),
            "bento_model_tag": str(info.tag),
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
            "batching": MAX_BATCH_SIZE > 1,
        }
        _RUNTIME["metadata"] = self.info
        logger.info("serving %s (MLflow %s v%s) on %s as %s, quantized=%s, torch threads=%d, "
                    "max_batch_size=%d, max_latency_ms=%d", self.info["bento_model_tag"],
                    self.info["model_name"], self.info["mlflow_version"], self.device,
                    self.info["dtype"], self.quantized, torch.get_num_threads(),
                    MAX_BATCH_SIZE, MAX_LATENCY_MS)

    @bentoml.api(batchable=MAX_BATCH_SIZE > 1, batch_dim=0,
                 max_batch_size=max(2, MAX_BATCH_SIZE), max_latency_ms=MAX_LATENCY_MS)
    def predict(self, texts: Texts) -> list[Prediction]:
        """Classify texts: per text the top label and the softmax probability of every label."""
        start = time.perf_counter()
        enc = self.tokenizer(list(texts), padding="longest", truncation=True,
                             max_length=self.max_tokens, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with torch.inference_mode():
            logits = self.classifier(**enc).logits
        probs = torch.softmax(logits.float(), dim=-1).cpu().tolist()
        BATCH_TEXTS.observe(len(texts))
        logger.debug("predict batch of %d texts in %.1f ms", len(texts),
                     (time.perf_counter() - start) * 1000)
        out = []
        for row in probs:
            best = max(range(len(row)), key=row.__getitem__)
            out.append(Prediction(label=self.labels[best],
                                  probabilities=dict(zip(self.labels, row))))
        return out

    @bentoml.api(route="/metadata")
    def metadata(self) -> dict[str, Any]:
        """What is being served: MLflow lineage, bento model tag, labels, device, batching."""
        return self.info


TextClassifier.add_asgi_middleware(RefusePickleMiddleware)
