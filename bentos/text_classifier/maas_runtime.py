"""Model runtimes of the MaaS text-classifier service: PyTorch (transformers) and ONNX Runtime.

Copied into every bento beside ``service.py``, which loads it from its own folder; it imports
nothing from the ``bentos`` package. Each runtime turns a list of texts into softmax
probabilities (one row per text, columns in label order) in one model call, and describes itself
in ``info`` (runtime, device, dtype, threads, providers) for ``/metadata`` and the start log.

- ``TorchRuntime``: with CUDA, bfloat16 (float16 where bf16 is unsupported) and SDPA attention
  under ``torch.inference_mode``; on CPU float32 with ``torch.set_num_threads(threads)``,
  optionally dynamic int8 (``quantize``).
- an own-module model (a folder with ``maas_own_runtime.py``, see ``own_runtime_file``): that
  file's ``Predictor``, which loads the user's source by path (torch, ``tokenizers``).
- ``OrtRuntime``: an ``onnxruntime.InferenceSession`` on ``model.onnx`` with all graph
  optimisations, TensorRT/CUDA execution providers when ONNX Runtime lists them, else CPU with
  ``threads`` intra-op threads; fed exactly the inputs the graph declares (int64). Its tokenizer
  is ``tokenizer.json`` run by the ``tokenizers`` package (``LeanTokenizer``): an ONNX worker
  imports neither torch nor transformers (transformers only for a folder without
  ``tokenizer.json``, i.e. a slow-only tokenizer).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

logger = logging.getLogger("bentoml.maas.text_classifier")

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
#: texts per forward pass when neither the bento settings nor the variant give one
DEFAULT_FORWARD_BATCH = 4


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads(workers: int) -> int:
    """All the cores a worker has (cores // workers): the serving benchmark measures this
    against fewer (``torch_threads``) on the target machine."""
    return max(1, cpu_cores() // max(1, workers))


def ort_providers() -> list[str]:
    """GPU providers ONNX Runtime offers here (TensorRT, then CUDA), always ending with CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in GPU_PROVIDERS if p in available] + ["CPUExecutionProvider"]


def _ort_gpu_build() -> bool:
    """Whether the installed ONNX Runtime has GPU provider libraries at all, found without
    importing it (``bentoml serve``'s supervisor process reads this too, and a CPU-only ONNX
    bento need not pay for onnxruntime + numpy in it)."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return False
    capi = Path(next(iter(spec.submodule_search_locations))) / "capi"
    return any(capi.glob("libonnxruntime_providers_cuda*")) or \
        any(capi.glob("libonnxruntime_providers_tensorrt*"))


def release_freed_memory() -> None:
    """Hand memory freed on the C heap back to the system (glibc ``malloc_trim``): loading an
    ONNX graph frees its protobuf copy, ~12 MiB of RSS per worker on a 23 MB int8 graph."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def has_gpu(runtime: str) -> bool:
    """Whether this runtime would run on a GPU here (decides the resources BentoML schedules)."""
    if runtime == "onnxruntime":
        return _ort_gpu_build() and ort_providers()[0] != "CPUExecutionProvider"
    import torch

    return torch.cuda.is_available()


def make_session(model_file: str | Path, threads: int, providers: list[str]) -> Any:
    """The ONNX Runtime session every MaaS ONNX variant runs in, served or measured: all graph
    optimisations, ``threads`` intra-op threads, no busy-waiting between runs (the event loop's
    HTTP and batching work needs those cycles; the pipeline measures variants the same way)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ort.InferenceSession(str(model_file), options, providers=providers)


def softmax_rows(logits: Any) -> list[list[float]]:
    import numpy as np

    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).tolist()


def encode_chunks(tokenizer: Any, texts: list[str], max_tokens: int,
                  chunk: int) -> list[tuple[list[int], dict[str, Any]]]:
    """Tokenise once, sort by length and cut into passes of at most ``chunk`` texts, each padded
    to its own longest text: ``[(positions in texts, {name: int64 array}), ...]``.

    Padding a merged batch of short and long texts to its longest one costs more than batching
    saves on CPU (SST-2 on 2 busy cores, ONNX int8, 32 texts per call: 97 texts/s in one padded
    pass, 178 in sorted passes of 8, 270 in passes of 4; see docs/serving.md)."""
    import numpy as np

    enc = tokenizer(texts, truncation=True, max_length=max_tokens)
    names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    order = sorted(range(len(texts)), key=lambda i: len(enc["input_ids"][i]))
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    out = []
    for start in range(0, len(order), max(1, chunk)):
        idx = order[start:start + max(1, chunk)]
        width = max(len(enc["input_ids"][i]) for i in idx)
        arrays = {}
        for name in names:
            arr = np.full((len(idx), width), pad_id if name == "input_ids" else 0, np.int64)
            for row, i in enumerate(idx):
                values = enc[name][i]
                arr[row, :len(values)] = values
            arrays[name] = arr
        out.append((idx, arrays))
    return out


def session_feed(arrays: dict[str, Any], input_names: list[str]) -> dict[str, Any]:
    """Exactly the inputs an ONNX graph declares; one it needs that the tokenizer does not make
    (``token_type_ids``) is zeros."""
    import numpy as np

    ids = arrays["input_ids"]
    return {name: arrays[name] if name in arrays else np.zeros_like(ids) for name in input_names}


class LeanTokenizer:
    """``tokenizer.json`` run by the ``tokenizers`` package, called like a transformers fast
    tokenizer is by :func:`encode_chunks` (``tokenizer(texts, truncation=True, max_length=n)``):
    the same token ids, as transformers itself hands the text to the same backend with special
    tokens added, no padding and longest-first truncation on the right. ``pad_token_id`` and
    ``model_max_length`` come from ``tokenizer_config.json`` / ``special_tokens_map.json``."""

    FILE = "tokenizer.json"

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.backend = Tokenizer.from_file(str(folder / self.FILE))
        self.backend.no_padding()  # encode_chunks pads each pass itself
        self.backend.no_truncation()
        self._truncation: int | None = None
        config = _read_json(folder / "tokenizer_config.json")
        special = _read_json(folder / "special_tokens_map.json")
        self.model_max_length = config.get("model_max_length")
        self.truncation_side = config.get("truncation_side") or "right"
        pad = config.get("pad_token") or special.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        self.pad_token_id = self.backend.token_to_id(pad) if isinstance(pad, str) else None

    def __call__(self, texts: list[str], truncation: bool = True,
                 max_length: int | None = None) -> dict[str, list[list[int]]]:
        limit = int(max_length) if truncation and max_length else None
        if limit != self._truncation:
            if limit is None:
                self.backend.no_truncation()
            else:
                self.backend.enable_truncation(limit, strategy="longest_first",
                                               direction=self.truncation_side)
            self._truncation = limit
        encs = self.backend.encode_batch(list(texts), add_special_tokens=True)
        return {"input_ids": [e.ids for e in encs],
                "attention_mask": [e.attention_mask for e in encs],
                "token_type_ids": [e.type_ids for e in encs]}


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text("utf-8")) if path.is_file() else {}


def load_tokenizer(path: str | Path, lean: bool = True) -> Any:
    """The ONNX runtime's tokenizer: :class:`LeanTokenizer` when ``tokenizer.json`` is there
    (and ``lean``), else transformers' ``AutoTokenizer``."""
    if lean and (Path(path) / LeanTokenizer.FILE).is_file():
        return LeanTokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _token_limit(*limits: Any) -> int:
    sane = [int(v) for v in limits if v and 0 < int(v) < 1_000_000]
    return min(sane) if sane else 512


class TorchRuntime:
    """A transformers sequence classifier (safetensors) in PyTorch."""

    name = "torch"

    def __init__(self, path: str | Path, *, threads: int, quantize: bool = False,
                 max_tokens: int | None = None,
                 forward_batch_size: int = DEFAULT_FORWARD_BATCH) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if cuda else "cpu")
        self.dtype = ((torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
                      if cuda else torch.float32)
        if not cuda:
            torch.set_num_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=self.dtype, use_safetensors=True,
            **({"attn_implementation": "sdpa"} if cuda else {}))
        self.quantized = False
        self.forward_batch_size = forward_batch_size
        if quantize and not cuda:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = torch.ao.quantization.quantize_dynamic(
                    model, {torch.nn.Linear}, dtype=torch.qint8)
            self.quantized = True
        elif quantize:
            logger.warning("quantize=True ignored on %s: dynamic int8 is CPU-only; serving in "
                           "%s", self.device, self.dtype)
        self.model = model.to(self.device).eval()
        cfg = model.config
        self.labels = [str(cfg.id2label.get(i, f"LABEL_{i}")) for i in range(cfg.num_labels)]
        self.max_tokens = _token_limit(getattr(self.tokenizer, "model_max_length", None),
                                       getattr(cfg, "max_position_embeddings", None), max_tokens)
        self.info = {
            "runtime": self.name, "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""), "quantize": self.quantized,
            "threads": torch.get_num_threads(), "torch_threads": torch.get_num_threads(),
            "attention": getattr(cfg, "_attn_implementation", None),
            "providers": [], "max_tokens": self.max_tokens,
            "forward_batch_size": forward_batch_size,
        }

    def probabilities(self, texts: list[str]) -> list[list[float]]:
        torch = self.torch
        out: list[Any] = [None] * len(texts)
        for idx, arrays in encode_chunks(self.tokenizer, texts, self.max_tokens,
                                         self.forward_batch_size):
            enc = {k: torch.from_numpy(v).to(self.device) for k, v in arrays.items()}
            with torch.inference_mode():
                logits = self.model(**enc).logits
            rows = torch.softmax(logits.float(), dim=-1).cpu().tolist()
            for i, row in zip(idx, rows, strict=True):
                out[i] = row
        return out


class OrtRuntime:
    """An ONNX graph (``model.onnx``) in ONNX Runtime, with the tokenizer saved beside it."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, *, threads: int, onnx: dict[str, Any],
                 labels: list[str], max_tokens: int | None = None,
                 forward_batch_size: int = DEFAULT_FORWARD_BATCH, lean: bool = True) -> None:
        path = Path(path)
        self.session = make_session(path / "model.onnx", threads, ort_providers())
        release_freed_memory()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = onnx.get("output_name") or "logits"
        self.tokenizer = load_tokenizer(path, lean)
        self.labels = list(labels)
        self.forward_batch_size = forward_batch_size
        self.max_tokens = _token_limit(
            getattr(self.tokenizer, "model_max_length", None),
            onnx.get("max_positions") or onnx.get("max_length"), max_tokens)
        used = self.session.get_providers()
        self.info = {
            "runtime": self.name,
            "device": "cuda" if used[0] in GPU_PROVIDERS else "cpu",
            "dtype": onnx.get("dtype") or "float32", "quantize": onnx.get("dtype") == "int8",
            "threads": threads, "torch_threads": None, "attention": None,
            "providers": used, "max_tokens": self.max_tokens,
            "forward_batch_size": forward_batch_size,
            "tokenizer": "tokenizers" if isinstance(self.tokenizer, LeanTokenizer)
            else "transformers",
        }

    def probabilities(self, texts: list[str]) -> list[list[float]]:
        out: list[Any] = [None] * len(texts)
        for idx, arrays in encode_chunks(self.tokenizer, texts, self.max_tokens,
                                         self.forward_batch_size):
            logits = self.session.run([self.output_name],
                                      session_feed(arrays, self.input_names))[0]
            for i, row in zip(idx, softmax_rows(logits), strict=True):
                out[i] = row
        return out


def load_runtime(variant: dict[str, Any], path: str | Path, settings: dict[str, Any],
                 labels: list[str], threads: int) -> TorchRuntime | OrtRuntime:
    """The runtime for the bento's variant (``bento_config.json`` ``variant``; none = torch)."""
    max_tokens = settings.get("max_tokens")
    fbs = int(settings.get("forward_batch_size") or DEFAULT_FORWARD_BATCH)
    own = own_runtime_file(path)
    if own is not None and (variant or {}).get("runtime", "torch") == "torch":
        return _load_file("maas_own_runtime_served", own).Predictor(
            path, threads=threads, batch_size=fbs, max_tokens=max_tokens)
    if (variant or {}).get("runtime", "torch") == "onnxruntime":
        if settings.get("quantize"):
            logger.warning("quantize=True ignored for ONNX variant %s: its graph is served as "
                           "it was made", variant.get("name"))
        return OrtRuntime(path, threads=threads, onnx=variant.get("onnx") or {},
                          labels=labels, max_tokens=max_tokens, forward_batch_size=fbs)
    return TorchRuntime(path, threads=threads, quantize=bool(settings.get("quantize")),
                        max_tokens=max_tokens, forward_batch_size=fbs)


def own_runtime_file(path: str | Path) -> Path | None:
    """``maas_own_runtime.py`` in a model folder: a user's own PyTorch module (MaaS own-module
    pyfunc), served by that file's ``Predictor`` (it loads the user's source by path)."""
    found = sorted(Path(path).rglob("maas_own_runtime.py"))
    return found[0] if found else None


def _load_file(name: str, path: Path) -> Any:
    import importlib.util
    import sys

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
