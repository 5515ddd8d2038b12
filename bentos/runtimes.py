"""The serving runtimes, one table: what each needs installed, whether it has a GPU here, and how
its session is set up. Read by the bento build (packages), the variant check (known names), the
pipeline's compression step (the session it measures ONNX variants in) and the services.

Standalone on purpose: standard library only at import and nothing from the ``bentos`` package,
so the build copies this file into every bento beside the service (``maas_runtimes.py``) and the
service loads it from its own folder. A new runtime is one entry in :data:`RUNTIMES`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: ONNX Runtime's GPU execution providers, fastest first
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def cpu_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def ort_providers() -> list[str]:
    """GPU providers ONNX Runtime offers here (TensorRT, then CUDA), always ending with CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in GPU_PROVIDERS if p in available] + ["CPUExecutionProvider"]


def ort_session(model_file: str | Path, threads: int, providers: list[str] | None = None) -> Any:
    """The ONNX Runtime session every MaaS ONNX model runs in, served or measured: all graph
    optimisations, ``threads`` intra-op threads, no busy-waiting between runs (the event loop's
    HTTP and batching work needs those cycles); ``providers`` default: :func:`ort_providers`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ort.InferenceSession(str(model_file), options,
                                    providers=providers or ort_providers())


def _torch_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _ort_gpu() -> bool:
    return ort_providers()[0] != "CPUExecutionProvider"


@dataclass(frozen=True)
class Runtime:
    """One serving runtime."""

    name: str
    #: what a bento serving a model in it needs (pinned to the installed versions at build)
    packages: tuple[str, ...]
    #: whether it would run on a GPU here (decides the resources BentoML schedules)
    has_gpu: Callable[[], bool]
    #: the model file it loads from a variant's folder; None: the model flavour's own folder
    model_file: str | None = None
    #: ``session(model_file, threads)``: an inference session (None: the family loads the model)
    session: Callable[..., Any] | None = None


RUNTIMES: dict[str, Runtime] = {
    "torch": Runtime("torch", ("torch", "safetensors"), _torch_gpu),
    "onnxruntime": Runtime("onnxruntime", ("onnxruntime", "numpy"), _ort_gpu,
                           model_file="model.onnx", session=ort_session),
}


def runtime(name: str) -> Runtime:
    """The runtime called ``name``; ValueError naming the known ones."""
    try:
        return RUNTIMES[name]
    except KeyError:
        raise ValueError(f"unknown serving runtime {name!r}; known: {sorted(RUNTIMES)}") from None


def has_gpu(name: str) -> bool:
    """Whether runtime ``name`` would run on a GPU here."""
    return runtime(name).has_gpu()


def pinned(packages: Iterable[str]) -> list[str]:
    """``pkg==version`` for each installed package (local labels such as +cpu dropped), the bare
    name for one that is not installed here; duplicates once, in first-seen order."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for pkg in dict.fromkeys(packages):
        try:
            pins.append(f"{pkg}=={version(pkg).split('+', 1)[0]}")
        except PackageNotFoundError:
            pins.append(pkg)
    return pins
