"""Serving settings baked into a bento (``BentoSettings``), with the conversions that let them come
from strings (``mlflow deployments create -C key=value``, ``maas build --variant``)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

#: the variant names the pipeline produces (informational: a version's ``maas.variants`` tag is
#: what a build checks a requested variant against)
VARIANT_NAMES = ("fp32", "onnx", "onnx-int8", "pruned", "pruned+onnx-int8")
_VARIANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


@dataclass(frozen=True)
class BentoSettings:
    """Serving settings baked into the bento.

    ``max_batch_size`` caps the texts per model call (BentoML's adaptive batcher merges the texts
    of concurrent requests and splits a large request across calls; 1 turns batching off).
    ``max_latency_ms`` is *not* a target latency: BentoML 1.4's batcher cancels queued requests
    whose estimated completion time exceeds it and answers them 503 (its estimate is rough,
    especially before it has seen batches of many sizes), so keep it well above the p99 you
    expect; admission control is ``max_concurrency`` (in-flight requests per service, the excess
    gets 429) and ``timeout`` (seconds per request, then 504). ``max_texts``/``max_chars`` are
    the per-request limits (400 naming the limit). ``quantize`` applies dynamic int8
    quantisation of ``nn.Linear`` at load time on CPU (ignored on GPU, where the model runs in
    bf16/fp16; ignored for ONNX variants, which are quantised, or not, when they are made).
    ``variant`` picks one of the registered version's compression variants (``maas.variants``
    tag); None serves the version's chosen one (``maas.variant`` tag, else ``fp32``).
    ``torch_threads`` is the model runtime's CPU threads per worker (torch, or ONNX Runtime's
    intra-op pool). ``access_log`` turns BentoML's per-request access log on or off (the
    Prometheus metrics at ``/metrics`` stay on either way). ``body_timeout_s`` is the deadline
    for receiving a request body (408 after it).
    """

    max_batch_size: int = 32
    max_latency_ms: int = 5000
    max_texts: int = 64
    max_chars: int = 2000
    timeout: float = 30.0
    max_concurrency: int = 64
    workers: int = 1
    quantize: bool = False
    service_name: str | None = None
    #: tokeniser truncation length; None = min(tokenizer.model_max_length, max positions)
    max_tokens: int | None = None
    #: model runtime CPU threads per worker (torch or ONNX Runtime); None = cores // workers
    torch_threads: int | None = None
    #: compression variant to serve; None = the version's chosen one (``maas.variant``)
    variant: str | None = None
    #: texts per forward pass: a model call's texts are sorted by length and run in passes of
    #: at most this many, each padded to its own longest text
    forward_batch_size: int = 4
    #: BentoML's per-request access log (one log record per request, costs CPU per request)
    access_log: bool = True
    #: seconds to receive a whole request body, else 408 (bounds how long a slow or stalled
    #: body holds a ``max_concurrency`` slot; chunked bodies are also cut at the byte limit: 413)
    body_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_latency_ms", "max_texts", "max_chars",
                     "max_concurrency", "workers", "forward_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BentoSettings.{name} must be a positive integer, got {value!r}")
        for name in ("max_tokens", "torch_threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"BentoSettings.{name} must be a positive integer or None, "
                                 f"got {value!r}")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) \
                or self.timeout <= 0:
            raise ValueError(f"BentoSettings.timeout must be > 0 seconds, got {self.timeout!r}")
        if isinstance(self.body_timeout_s, bool) \
                or not isinstance(self.body_timeout_s, (int, float)) or self.body_timeout_s <= 0:
            raise ValueError("BentoSettings.body_timeout_s must be > 0 seconds, "
                             f"got {self.body_timeout_s!r}")
        if not isinstance(self.access_log, bool):
            raise ValueError(  # noqa: TRY004
                f"BentoSettings.access_log must be a bool, got {self.access_log!r}")
        if not isinstance(self.quantize, bool):
            raise ValueError(  # noqa: TRY004 (callers handle ValueError for all settings)
                f"BentoSettings.quantize must be a bool, got {self.quantize!r}")
        if self.service_name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*",
                                                              self.service_name):
            raise ValueError("BentoSettings.service_name must be a Python-identifier-like name "
                             f"(letters, digits, _), got {self.service_name!r}")
        if self.variant is not None and (not isinstance(self.variant, str)
                                         or not _VARIANT_RE.fullmatch(self.variant)):
            raise ValueError(f"BentoSettings.variant must be a variant name such as "
                             f"{', '.join(VARIANT_NAMES)}; got {self.variant!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, config: dict[str, Any] | None) -> BentoSettings:
        """Settings from a plain mapping (e.g. an MLflow deployment ``config``); string values
        such as ``"32"`` or ``"true"`` (from ``mlflow deployments create -C k=v``) are converted.
        Unknown keys raise ``ValueError``."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(config or {}) - set(known))
        if unknown:
            raise ValueError(f"unknown bento setting(s) {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for key, raw in (config or {}).items():
            default = known[key].default
            values[key] = _coerce(key, raw, default)
        return cls(**values)


def _coerce(key: str, raw: Any, default: Any) -> Any:
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"bento setting {key}: expected a boolean, got {raw!r}")
    if key in ("service_name", "variant"):
        return text or None
    if text.lower() in ("", "none", "null") and default is None:
        return None
    try:
        return float(text) if isinstance(default, float) else int(text)
    except ValueError:
        raise ValueError(f"bento setting {key}: expected a number, got {raw!r}") from None
