"""Model runtimes of the MaaS image-classifier service: PyTorch and ONNX Runtime.

Copied into every image bento beside ``service.py``, which loads it (and ``maas_nets.py``) from
its own folder; the pipeline imports it as ``bentos.image_classifier.maas_runtime`` to measure
variants the way they are served. The shared runtime table (GPU check, ONNX Runtime session,
cores) is ``maas_runtimes.py`` beside it in a bento, ``bentos.runtimes`` in the source tree.

Both runtimes take a float32 batch ``(N, C, S, S)`` in [0, 1] (``maas_images.to_array``) and
return softmax probabilities, one row per image, columns in label order, in passes of at most
``forward_batch_size`` images. The model folder holds ``maas_variant.json`` (labels, channels,
image_size, runtime) and either ``model.safetensors`` (torch; the network spec in its metadata)
or ``model.onnx`` (a single-file graph, input ``images``, output ``logits``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("bentoml.maas.image_classifier")

META_FILE = "maas_variant.json"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
INPUT_NAME, OUTPUT_NAME = "images", "logits"
DEFAULT_FORWARD_BATCH = 64
#: the shared serving-runtime table (``bentos/runtimes.py``), copied into every bento beside
#: this file under this name
TABLE_FILE = "maas_runtimes.py"


def table() -> Any:
    """The serving-runtime table: ``maas_runtimes.py`` beside this file inside a bento,
    ``bentos.runtimes`` in the source tree (the same file)."""
    import importlib
    import importlib.util
    import sys

    path = Path(__file__).with_name(TABLE_FILE)
    if not path.is_file():
        return importlib.import_module("bentos.runtimes")
    name = f"{__name__}_maas_runtimes"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def default_threads(workers: int) -> int:
    """Runtime threads per worker: the cores this process may use, shared by the workers."""
    return max(1, table().cpu_cores() // max(1, workers))


def has_gpu(runtime: str) -> bool:
    """Whether ``runtime`` would run on a GPU here (decides the resources BentoML schedules)."""
    return table().has_gpu(runtime)


def softmax(logits: Any) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return (z / z.sum(axis=1, keepdims=True)).astype(np.float32)


def _chunks(batch: np.ndarray, size: int) -> list[np.ndarray]:
    return [batch[i:i + size] for i in range(0, len(batch), max(1, size))]


class TorchRuntime:
    """The network of ``model.safetensors`` in PyTorch (fp32 on CPU, bf16/fp16 on CUDA)."""

    name = "torch"

    def __init__(self, path: str | Path, nets: Any, *, threads: int,
                 forward_batch_size: int = DEFAULT_FORWARD_BATCH) -> None:
        import torch
        from safetensors import safe_open

        self.torch = torch
        weights = find_file(path, WEIGHTS_FILE)
        with safe_open(str(weights), framework="pt") as f:
            spec = json.loads(f.metadata()["maas.spec"])
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if cuda else "cpu")
        self.dtype = ((torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
                      if cuda else torch.float32)
        if not cuda:
            torch.set_num_threads(threads)
        self.net = nets.load_net(spec, str(weights)).to(self.device, self.dtype)
        self.forward_batch_size = forward_batch_size
        self.info = {"runtime": self.name, "device": str(self.device),
                     "dtype": str(self.dtype).replace("torch.", ""), "threads":
                     torch.get_num_threads(), "providers": [], "arch": spec.get("arch"),
                     "forward_batch_size": forward_batch_size}

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        torch = self.torch
        out = []
        with torch.inference_mode():
            for chunk in _chunks(batch, self.forward_batch_size):
                x = torch.from_numpy(np.ascontiguousarray(chunk)).to(self.device, self.dtype)
                out.append(torch.softmax(self.net(x).float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


class OrtRuntime:
    """A single-file ONNX graph (``model.onnx``) in ONNX Runtime."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, *, threads: int, dtype: str = "float32",
                 forward_batch_size: int = DEFAULT_FORWARD_BATCH) -> None:
        model_file = find_file(path, ONNX_FILE) if Path(path).is_dir() else Path(path)
        self.session = table().ort_session(model_file, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.forward_batch_size = forward_batch_size
        used = self.session.get_providers()
        gpu = used[0] in table().GPU_PROVIDERS
        self.info = {"runtime": self.name, "device": "cuda" if gpu else "cpu",
                     "dtype": dtype, "threads": threads, "providers": used,
                     "forward_batch_size": forward_batch_size}

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        out = [softmax(self.session.run([OUTPUT_NAME], {self.input_name: chunk})[0])
               for chunk in _chunks(np.ascontiguousarray(batch, np.float32),
                                    self.forward_batch_size)]
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def find_file(root: str | Path, name: str) -> Path:
    """``name`` in a BentoML model folder: at its root, or below it (an MLflow model folder
    copied as it is: ``artifacts/`` of a pyfunc, ``extra_files/`` of an ONNX model)."""
    found = sorted(Path(root).rglob(name), key=lambda p: len(p.parts))
    if not found:
        raise FileNotFoundError(f"{root} has no {name} (not a MaaS image model)")
    return found[0]


def read_meta(path: str | Path) -> dict[str, Any]:
    """``maas_variant.json`` of a model folder: labels, channels, image_size, runtime, dtype."""
    return json.loads(find_file(path, META_FILE).read_text("utf-8"))


def load_runtime(path: str | Path, nets: Any, settings: dict[str, Any],
                 threads: int) -> TorchRuntime | OrtRuntime:
    """The runtime the model folder asks for (``maas_variant.json`` ``runtime``)."""
    meta = read_meta(path)
    fbs = int(settings.get("forward_batch_size") or DEFAULT_FORWARD_BATCH)
    own = sorted(Path(path).rglob("maas_own_runtime.py"))
    if own and meta.get("runtime") != "onnxruntime":  # a user's own module (it loads the source)
        return own_predictor(own[0], path, threads, fbs)
    if meta.get("runtime") == "onnxruntime":
        return OrtRuntime(path, threads=threads, dtype=meta.get("dtype") or "float32",
                          forward_batch_size=fbs)
    if nets is None:
        raise RuntimeError(f"{path} holds a torch model but the bento was built for ONNX Runtime")
    return TorchRuntime(path, nets, threads=threads, forward_batch_size=fbs)


def own_predictor(runtime_file: Path, path: str | Path, threads: int, batch_size: int) -> Any:
    """The ``Predictor`` of an own-module model (``maas_own_runtime.py``, logged with it), with
    ``probabilities`` returning an array like the other runtimes."""
    import importlib.util
    import sys

    name = "maas_own_runtime_served"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, runtime_file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    predictor = sys.modules[name].Predictor(path, threads=threads, batch_size=batch_size)
    predictor.probabilities = predictor.proba
    return predictor
