"""BentoML 1.4 service for an image classifier: one variant (torch or ONNX Runtime) of a
registered MaaS image model.

Copied into each image bento with the other ``maas_*.py`` files of this folder and a
``bento_config.json`` (model tag, variant, batching, limits, MLflow lineage) read at import time.
The BentoML model folder holds ``maas_variant.json`` (labels, channels, image_size, runtime) and
``model.safetensors`` or ``model.onnx`` (at its root, or under ``artifacts/`` for the MLflow
  pyfunc folder of an fp32 model).

Endpoints:
- ``POST /classify`` takes one or more images as
  * ``multipart/form-data``, the files in the repeated form field ``images``;
  * a raw body of type ``image/png``, ``image/jpeg``, ``image/bmp`` or ``image/webp`` (one image);
  * JSON ``{"images": ["<base64>", ...]}`` (items may also be ``{"name": ..., "data": ...}``),
  and answers ``[{"label": str, "probabilities": {label: p, ...}}, ...]``, one entry per image in
  order. Multipart and raw bodies are turned into the JSON form by ``maas_upload.py`` before
  BentoML reads the request, so there is one API and one validation path. Adaptive batching:
  each request's images are checked and decoded while its body is validated (before the
  batcher), into one ``(N, C, S, S)`` array; the batcher concatenates the arrays of concurrent
  requests into model calls of at most ``max_batch_size`` images.
- ``GET /metadata``: lineage, variant, runtime, labels, input shape, limits; ``GET /card``: the
  model card (``?format=json``).

Limits (``bento_config.json`` settings): ``max_images`` per request (413 for multipart, 400 for
JSON, naming the limit), ``max_image_bytes`` per image (413), ``max_pixels`` per image (width x
height from the header, before decoding: 400 naming the image), the whole body (413 from
``Content-Length`` or while it streams in; 408 after ``body_timeout_s``). A content type that is
not an image, multipart or JSON gets 415; a corrupt, truncated or non-image file gets 400 naming
which image (its position and file name). Pickle bodies are refused (415) on every route.
"""

import importlib.util
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import bentoml
from pydantic import AfterValidator, BaseModel

logger = logging.getLogger("bentoml.maas.image_classifier")

CONFIG_PATH = Path(__file__).with_name("bento_config.json")
DEFAULT_SETTINGS: dict[str, Any] = {
    "max_batch_size": 32, "max_latency_ms": 5000, "timeout": 30.0, "max_concurrency": 64,
    "workers": 1, "service_name": None, "torch_threads": None, "variant": None,
    "forward_batch_size": None, "access_log": True, "body_timeout_s": 5.0,
    "max_images": 16, "max_image_bytes": 4 * 1024 * 1024, "max_pixels": 4096 * 4096,
}


def _sibling(stem: str) -> Any:
    """``<stem>.py`` from this file's folder (the bento's ``src/``), cached per service module."""
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
MAX_BATCH_SIZE = int(SETTINGS["max_batch_size"])
MAX_LATENCY_MS = int(SETTINGS["max_latency_ms"])
WORKERS = int(SETTINGS["workers"])
MAX_IMAGES = int(SETTINGS["max_images"])
MAX_IMAGE_BYTES = int(SETTINGS["max_image_bytes"])
MAX_PIXELS = int(SETTINGS["max_pixels"])
SERVICE_NAME = SETTINGS.get("service_name") or "ImageClassifier"
VARIANT: dict[str, Any] = CONFIG["variant"]
RUNTIME_NAME = VARIANT.get("runtime") or "torch"
images = _sibling("maas_images")
runtimes = _sibling("maas_runtime")
#: the network definitions (torch): loaded only by a bento that serves the torch model, so an
#: ONNX Runtime bento runs without torch installed
nets = _sibling("maas_nets") if RUNTIME_NAME == "torch" else None
guard = _sibling("maas_guard")
upload = _sibling("maas_upload")
HAS_GPU = runtimes.has_gpu(RUNTIME_NAME)
THREADS = int(SETTINGS.get("torch_threads") or runtimes.default_threads(WORKERS))
#: the largest valid body: every image at its byte limit, base64 (4/3) plus the JSON envelope
MAX_BODY_BYTES = upload.max_body_bytes(MAX_IMAGES, MAX_IMAGE_BYTES)
BODY_TIMEOUT_S = float(SETTINGS.get("body_timeout_s") or DEFAULT_SETTINGS["body_timeout_s"])
#: filled by the service instance: the model's input shape, read by the request validator
_RUNTIME: dict[str, Any] = {}


def _decode_all(items: list[Any]) -> Any:
    """The request's images, checked (count, bytes, header, pixels, decoding) and converted to
    one float32 ``(N, C, S, S)`` batch; a ValueError (400) names the limit or the image."""
    import numpy as np

    if not items:
        raise ValueError(f"images is empty: send 1 to max_images={MAX_IMAGES} images")
    if len(items) > MAX_IMAGES:
        raise ValueError(f"too many images: {len(items)} > max_images={MAX_IMAGES} per request")
    channels, size = _RUNTIME.get("shape") or (None, None)
    if channels is None:
        raise ValueError("the model is not loaded yet")
    out = []
    for i, item in enumerate(items):
        name, data = upload.item_bytes(item, i, MAX_IMAGE_BYTES)
        try:
            decoded = images.decode(data, name, MAX_PIXELS)
        except images.ImageError as exc:
            raise ValueError(str(exc)) from None
        out.append(images.to_array(decoded.image, channels, size))
    return np.stack(out)


Images = Annotated[list[Any], AfterValidator(_decode_all)]


class Prediction(BaseModel):
    label: str
    probabilities: dict[str, float]


Predictions = Annotated[list[Prediction], bentoml.validators.ContentType("application/json")]


@bentoml.asgi_app(http.metadata_app(_RUNTIME, Path(__file__).parent), path="/",
                  name="maas_metadata")
@bentoml.service(**http.service_options(SERVICE_NAME, SETTINGS, THREADS, WORKERS, HAS_GPU))
class ImageClassifier:
    if MODEL_TAG:
        model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        if not MODEL_TAG:
            raise http.no_model(CONFIG_PATH)
        stored = self.model
        meta = runtimes.read_meta(stored.path)
        self.runtime = runtimes.load_runtime(stored.path, nets, SETTINGS, THREADS)
        self.labels = [str(x) for x in meta["labels"]]
        _RUNTIME["shape"] = (int(meta["channels"]), int(meta["image_size"]))
        self.info = self._describe(str(stored.info.tag), meta)
        _RUNTIME["metadata"] = self.info
        logger.info("serving %s (MLflow %s v%s) variant=%s runtime=%s device=%s threads=%s "
                    "input=%sx%sx%s max_batch_size=%d", self.info["bento_model_tag"],
                    self.info["model_name"], self.info["model_version"], self.info["variant"],
                    self.info["runtime"], self.info["device"], self.info["threads"],
                    meta["channels"], meta["image_size"], meta["image_size"], MAX_BATCH_SIZE)

    def _describe(self, bento_model_tag: str, meta: dict[str, Any]) -> dict[str, Any]:
        mlflow_info = CONFIG["mlflow"]
        return {
            "service": SERVICE_NAME, "model_name": mlflow_info.get("mlflow_model_name", ""),
            "model_version": mlflow_info.get("mlflow_version", ""),
            "run_id": mlflow_info.get("mlflow_run_id", ""), "alias": mlflow_info.get("alias", ""),
            "model_uri": mlflow_info.get("model_uri", ""),
            "variant": VARIANT.get("name") or meta.get("variant") or "fp32",
            "variant_model_uri": VARIANT.get("model_uri", ""),
            "variant_accuracy": VARIANT.get("accuracy"), "bento_tag": http.bento_tag(),
            "bento_model_tag": bento_model_tag, "labels": self.labels,
            "channels": int(meta["channels"]), "image_size": int(meta["image_size"]),
            "arch": meta.get("arch"), **self.runtime.info,
            "max_batch_size": MAX_BATCH_SIZE, "max_latency_ms": MAX_LATENCY_MS,
            "api": {"route": "/classify", "input": "images", "max_items": MAX_IMAGES},
            "max_images": MAX_IMAGES, "max_image_bytes": MAX_IMAGE_BYTES,
            "max_pixels": MAX_PIXELS, "max_body_bytes": MAX_BODY_BYTES,
            "max_concurrency": int(SETTINGS["max_concurrency"]),
            "timeout": float(SETTINGS["timeout"]), "workers": WORKERS,
            "batching": MAX_BATCH_SIZE > 1,
        }

    def predict_batch(self, batch: Any) -> list[dict[str, Any]]:
        """One model call on a ``(N, C, S, S)`` batch: label + probabilities per image."""
        start = time.perf_counter()
        probs = self.runtime.probabilities(batch).tolist()
        logger.debug("batch of %d images in %.1f ms", len(probs),
                     (time.perf_counter() - start) * 1000)
        return [{"label": self.labels[max(range(len(row)), key=row.__getitem__)],
                 "probabilities": dict(zip(self.labels, row, strict=True))} for row in probs]

    @bentoml.api(route="/classify", batchable=MAX_BATCH_SIZE > 1, batch_dim=0,
                 max_batch_size=max(2, MAX_BATCH_SIZE), max_latency_ms=MAX_LATENCY_MS)
    def classify(self, images: Images) -> Predictions:
        """Classify 1 to max_images images (multipart field ``images``, a raw image body, or
        JSON base64): per image the top label and the softmax probability of every label."""
        return [Prediction(**p) for p in self.predict_batch(images)]

    @bentoml.api(route="/metadata")
    def metadata(self) -> dict[str, Any]:
        """What is being served: lineage, variant, runtime, labels, input shape, limits."""
        return self.info


# outermost first: content types and Content-Length (415/413), then the body deadline and the
# streamed byte limit (408/413), then multipart / raw image bodies turned into the JSON form
ImageClassifier.add_asgi_middleware(upload.RequestGuardMiddleware, max_body_bytes=MAX_BODY_BYTES)
ImageClassifier.add_asgi_middleware(guard.BodyGuardMiddleware, max_bytes=MAX_BODY_BYTES,
                                    timeout_s=BODY_TIMEOUT_S)
ImageClassifier.add_asgi_middleware(upload.UploadMiddleware, max_images=MAX_IMAGES,
                                    max_image_bytes=MAX_IMAGE_BYTES)
