"""Serving settings baked into a bento (``BentoSettings``, one pydantic model: the pipeline file's
``bento:`` section is this model too), with the conversions that let them come from strings
(``mlflow deployments create -C key=value``, ``maas webhook serve --set key=value``)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

#: the variant names the pipeline produces (informational: a version's ``maas.variants`` tag is
#: what a build checks a requested variant against)
VARIANT_NAMES = ("fp32", "onnx", "onnx-int8", "pruned", "pruned+onnx-int8", "distilled",
                 "distilled+onnx-int8")
_VARIANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_SERVICE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class BentoSettings(BaseModel):
    """Serving settings baked into the bento.

    ``max_batch_size`` caps the texts per model call (BentoML's adaptive batcher merges the texts
    of concurrent requests and splits a large request across calls; 1 turns batching off).
    ``max_latency_ms`` is *not* a target latency: BentoML 1.4's batcher cancels queued requests
    whose estimated completion time exceeds it and answers them 503 (its estimate is rough,
    especially before it has seen batches of many sizes), so keep it well above the p99 you
    expect; admission control is ``max_concurrency`` (in-flight requests per service, the excess
    gets 429) and ``timeout`` (seconds per request, then 504). ``max_texts``/``max_chars`` are
    the per-request limits (400 naming the limit). Values are checked strictly (no ``"32"`` for
    32, no ``1`` for ``true``): strings go through ``from_mapping``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    max_batch_size: int = Field(32, ge=1, description="texts per model call (adaptive batching; "
                                "1 turns batching off)")
    max_latency_ms: int = Field(5000, ge=1, description="BentoML's batcher answers 503 to queued "
                                "requests it predicts would exceed this (not a target latency)")
    max_texts: int = Field(64, ge=1, description="texts per request, else 400")
    max_chars: int = Field(2000, ge=1, description="characters per text, else 400")
    timeout: float = Field(30.0, gt=0, description="seconds per request, then 504")
    max_concurrency: int = Field(64, ge=1, description="in-flight requests per service, the "
                                 "excess gets 429")
    workers: int = Field(1, ge=1, description="service worker processes")
    quantize: bool = Field(False, description="dynamic int8 quantisation of nn.Linear at load on "
                           "CPU (ignored on GPU, which runs bf16/fp16, and for ONNX variants)")
    service_name: str | None = Field(None, description="the bento's service class name "
                                     "(letters, digits, _)")
    max_tokens: int | None = Field(None, ge=1, description="tokeniser truncation length; None = "
                                   "min(tokenizer.model_max_length, max positions)")
    torch_threads: int | None = Field(None, ge=1, description="model runtime CPU threads per "
                                      "worker (torch or ONNX Runtime); None = cores // workers")
    variant: str | None = Field(None, description="compression variant to serve (a name in the "
                                "version's maas.variants tag); None = the version's chosen one "
                                "(maas.variant tag, else fp32)")
    forward_batch_size: int | None = Field(None, ge=1, description="texts per forward pass: a "
                                           "call's texts are sorted by length and run in passes "
                                           "of at most this many; None = the size the pipeline "
                                           "measured fastest for the variant, else 4")
    access_log: bool = Field(True, description="BentoML's per-request access log (the metrics at "
                             "/metrics stay on either way)")
    body_timeout_s: float = Field(5.0, gt=0, description="seconds to receive a whole request "
                                  "body, else 408 (bounds how long a slow body holds a slot)")

    @field_validator("service_name")
    @classmethod
    def _service_name(cls, v: str | None) -> str | None:
        if v is not None and not _SERVICE_RE.fullmatch(v):
            raise ValueError("must be a Python-identifier-like name (letters, digits, _), "
                             f"got {v!r}")
        return v

    @field_validator("variant")
    @classmethod
    def _variant(cls, v: str | None) -> str | None:
        if v is not None and not _VARIANT_RE.fullmatch(v):
            raise ValueError(f"must be a variant name such as {', '.join(VARIANT_NAMES)}; "
                             f"got {v!r}")
        return v

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    @classmethod
    def from_mapping(cls, config: dict[str, Any] | None) -> BentoSettings:
        """Settings from a plain mapping (e.g. an MLflow deployment ``config``); string values
        such as ``"32"`` or ``"true"`` (from ``mlflow deployments create -C k=v``) are converted.
        Unknown keys and bad values raise ``ValueError`` naming the setting."""
        known = BentoSettings.model_fields
        unknown = sorted(set(config or {}) - set(known))
        if unknown:
            raise ValueError(f"unknown bento setting(s) {unknown}; known: {sorted(known)}")
        values = {key: _coerce(key, raw, known[key].default) for key, raw in
                  (config or {}).items()}
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ValueError("; ".join(f"bento setting {'.'.join(map(str, e['loc']))}: "
                                       f"{e['msg']}" for e in exc.errors())) from None


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
