"""Model runtimes of the MaaS text-embedder service: PyTorch (transformers) and ONNX Runtime.

Copied into every embedder bento beside ``service.py``; the pipeline imports it as
``bentos.text_embedder.maas_runtime`` to measure variants the way they are served. The
tokenisation, length-sorted passes and ONNX session are the text classifier's
(``maas_text.py`` beside this file, the same file as ``bentos/text_classifier/maas_runtime.py``).

Both runtimes turn a list of texts into float32 embeddings ``(N, dim)`` in passes of at most
``forward_batch_size`` texts, rows in input order. The torch runtime pools the encoder's last
hidden state itself (``maas_embedder.json``: pooling, normalize, max_length, dim); an ONNX graph
has pooling and normalisation inside (output ``embeddings``) and runs with ``tokenizers`` only:
an ONNX worker imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("bentoml.maas.text_embedder")

SETTINGS_FILE = "maas_embedder.json"
META_FILE = "maas_variant.json"
ONNX_FILE = "model.onnx"
DEFAULT_FORWARD_BATCH = 16


def text() -> Any:
    """``maas_text.py`` beside this file (the text classifier's runtime helpers)."""
    name = f"{__name__}_maas_text"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(
            "maas_text.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _settings(path: Path) -> tuple[Path, dict[str, Any]]:
    """(folder, settings): ``maas_variant.json`` of an ONNX folder, else the encoder folder with
    ``maas_embedder.json`` anywhere under ``path`` (an MLflow pyfunc folder keeps it in
    ``artifacts/encoder``)."""
    if (path / META_FILE).is_file() and (path / ONNX_FILE).is_file():
        return path, json.loads((path / META_FILE).read_text("utf-8"))
    found = sorted(Path(path).rglob(SETTINGS_FILE))
    if not found:
        raise FileNotFoundError(f"{path} has no {SETTINGS_FILE} or {ONNX_FILE} + {META_FILE}")
    return found[0].parent, json.loads(found[0].read_text("utf-8"))


class TorchEmbedRuntime:
    name = "torch"

    def __init__(self, path: str | Path, *, threads: int, max_tokens: int | None = None,
                 forward_batch_size: int = DEFAULT_FORWARD_BATCH) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        folder, self.settings = _settings(Path(path))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.encoder = AutoModel.from_pretrained(folder, use_safetensors=True)
        self.encoder = self.encoder.to(self.device).eval()
        self.forward_batch_size = forward_batch_size
        self.max_tokens = min(int(self.settings["max_length"]), int(max_tokens or 10**6))
        self.info = _info(self.name, self.settings, self.max_tokens, forward_batch_size,
                          device=str(self.device), threads=torch.get_num_threads())

    def embed(self, texts: list[str]) -> np.ndarray:
        torch, s = self.torch, self.settings
        out = np.zeros((len(texts), int(s["dim"])), dtype=np.float32)
        for idx, arrays in text().encode_chunks(self.tokenizer, texts, self.max_tokens,
                                                self.forward_batch_size):
            enc = {k: torch.from_numpy(v).to(self.device) for k, v in arrays.items()}
            with torch.inference_mode():
                hidden = self.encoder(**enc).last_hidden_state.float()
            out[idx] = pool(hidden.cpu().numpy(), arrays["attention_mask"], s["pooling"],
                            bool(s["normalize"]))
        return out


class OrtEmbedRuntime:
    name = "onnxruntime"

    def __init__(self, path: str | Path, *, threads: int, max_tokens: int | None = None,
                 forward_batch_size: int = DEFAULT_FORWARD_BATCH) -> None:
        t = text()
        folder, self.settings = _settings(Path(path))
        self.session = t.make_session(folder / ONNX_FILE, threads, t.ort_providers())
        t.release_freed_memory()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.settings.get("output_name") or "embeddings"
        self.tokenizer = t.load_tokenizer(folder)
        self.forward_batch_size = forward_batch_size
        self.max_tokens = min(int(self.settings["max_length"]), int(max_tokens or 10**6))
        used = self.session.get_providers()
        self.info = _info(self.name, self.settings, self.max_tokens, forward_batch_size,
                          device="cuda" if used[0] in t.GPU_PROVIDERS else "cpu",
                          threads=threads, providers=used)

    def embed(self, texts: list[str]) -> np.ndarray:
        t = text()
        out = np.zeros((len(texts), int(self.settings["dim"])), dtype=np.float32)
        for idx, arrays in t.encode_chunks(self.tokenizer, texts, self.max_tokens,
                                           self.forward_batch_size):
            out[idx] = self.session.run([self.output_name],
                                        t.session_feed(arrays, self.input_names))[0]
        return out


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str, normalize: bool) -> np.ndarray:
    """Pooled rows of ``hidden`` (batch, seq, dim) under ``mask`` (batch, seq), numpy."""
    m = mask[..., None].astype(hidden.dtype)
    if mode == "cls":
        v = hidden[:, 0]
    elif mode == "max":
        v = np.where(m > 0, hidden, np.finfo(hidden.dtype).min).max(1)
    else:
        v = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    if normalize:
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return v.astype(np.float32)


def _info(name: str, settings: dict[str, Any], max_tokens: int, fbs: int, *, device: str,
          threads: int, providers: list[str] | None = None) -> dict[str, Any]:
    return {"runtime": name, "device": device, "threads": threads, "providers": providers or [],
            "dim": int(settings["dim"]), "pooling": settings["pooling"],
            "normalized": bool(settings["normalize"]), "max_tokens": max_tokens,
            "forward_batch_size": fbs, "dtype": settings.get("dtype") or "float32"}


def load_runtime(variant: dict[str, Any], path: str | Path, settings: dict[str, Any],
                 threads: int) -> TorchEmbedRuntime | OrtEmbedRuntime:
    """The runtime of the bento's variant (``bento_config.json`` ``variant``; none = torch)."""
    kwargs = {"threads": threads, "max_tokens": settings.get("max_tokens"),
              "forward_batch_size": int(settings.get("forward_batch_size")
                                        or DEFAULT_FORWARD_BATCH)}
    if (variant or {}).get("runtime", "torch") == "onnxruntime":
        return OrtEmbedRuntime(path, **kwargs)
    return TorchEmbedRuntime(path, **kwargs)
