"""The image family's compression variants: ``onnx`` (fp32 graph) and ``onnx-int8`` (static QDQ).

Dynamic int8 only quantises MatMul/Gemm-like operators, which leaves convolutions in fp32; static
quantisation (``quantize_static``, QDQ format, per-channel weights) calibrates the activations
on training images and covers the convolutions. Each variant is measured through the runtime the
bento serves it with (``bentos/image_classifier/maas_runtime.py``).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.families.base import BuiltVariant
from pipelines.families.image_classifier.model import ImageModel, predict_proba, save
from pipelines.families.image_classifier.tracking import log_model, log_onnx, serving_meta

log = logging.getLogger(__name__)

OPSET = 17


def runtimes() -> Any:
    from bentos.image_classifier import maas_runtime

    return maas_runtime


def export_onnx(model: ImageModel, path: Path) -> Path:
    """The network as a single-file ONNX graph: input ``images`` ``(N, C, S, S)`` float32 (batch
    axis dynamic), output ``logits``."""
    import torch

    net = model.net.eval().to("cpu")
    s = model.image_size
    example = torch.zeros(1, model.channels, s, s)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (example,), str(path), input_names=["images"],
                          output_names=["logits"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    return path


class _Calibration:
    """Feeds calibration batches to ``quantize_static`` (ONNX Runtime's CalibrationDataReader)."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self.batches, self.i = batches, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {"images": self.batches[self.i - 1]}

    def rewind(self) -> None:
        self.i = 0


def quantize_int8(src: Path, dst: Path, calibration: np.ndarray, per_channel: bool = True,
                  batch: int = 32) -> Path:
    """Static int8 (QDQ, int8 weights and activations) of ``src`` calibrated on ``calibration``
    images ``(N, C, S, S)``."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_name(dst.stem + "-pre.onnx")
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    batches = [np.ascontiguousarray(calibration[i:i + batch], np.float32)
               for i in range(0, len(calibration), batch)]
    quantize_static(str(pre), str(dst), _Calibration(batches), quant_format=QuantFormat.QDQ,
                    per_channel=per_channel, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8)
    return dst


class TorchClassifier:
    """The fp32 model as a :class:`~pipelines.families.base.Classifier`."""

    runtime = "torch"

    def __init__(self, model: ImageModel, batch_size: int = 64) -> None:
        self.model, self.batch_size = model, batch_size

    def predict_proba(self, inputs: list[Any]) -> np.ndarray:
        return predict_proba(self.model, inputs, self.batch_size)


class OrtClassifier:
    """An ONNX variant in the session the bento serves it with."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: int, dtype: str, batch_size: int = 64) -> None:
        self.ort = runtimes().OrtRuntime(path, threads=threads, dtype=dtype,
                                         forward_batch_size=batch_size)
        self.session = self.ort.session

    def predict_proba(self, inputs: list[Any]) -> np.ndarray:
        return self.ort.probabilities(np.asarray(inputs, dtype=np.float32))


class ImageCompressor:
    """Builds ``fp32``, ``onnx`` and ``onnx-int8`` of a tuned model (files under ``workdir``)."""

    def __init__(self, model: ImageModel, calibration: np.ndarray, workdir: Path,
                 threads: int, per_channel: bool = True, batch_size: int = 64) -> None:
        self.model, self.calibration, self.dir = model, calibration, Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.threads, self.per_channel, self.batch_size = threads, per_channel, batch_size
        self._onnx: Path | None = None

    def build(self, name: str) -> BuiltVariant:
        params = int(sum(p.numel() for p in self.model.net.parameters()))
        if name == "fp32":
            size = save(self.model, self.dir / "fp32").stat().st_size / 1e6
            return BuiltVariant(name, "torch", TorchClassifier(self.model, self.batch_size),
                                params, size, {}, artifact=self.model)
        if name == "onnx":
            path, settings, dtype = self.onnx(), {}, "float32"
        elif name == "onnx-int8":
            path = quantize_int8(self.onnx(), self.dir / "onnx-int8.onnx", self.calibration,
                                 self.per_channel)
            settings = {"int8.mode": "static", "int8.format": "QDQ",
                        "int8.per_channel": self.per_channel,
                        "int8.calibration_images": len(self.calibration)}
            dtype = "int8"
        else:
            raise ValueError(f"image_classifier builds fp32, onnx and onnx-int8, not {name!r}")
        clf = OrtClassifier(path, self.threads, dtype, self.batch_size)
        return BuiltVariant(name, "onnxruntime", clf, params, path.stat().st_size / 1e6,
                            {**settings, "providers": clf.session.get_providers()},
                            artifact=path)

    def onnx(self) -> Path:
        if self._onnx is None:
            self._onnx = export_onnx(self.model, self.dir / "onnx.onnx")
        return self._onnx

    def log(self, variant: BuiltVariant, labels: list[str]) -> str:
        if isinstance(variant.artifact, Path):
            dtype = "int8" if variant.name.endswith("int8") else "float32"
            meta = serving_meta(self.model, variant.name, "onnxruntime", dtype)
            return log_onnx(variant.artifact, meta)
        return log_model(self.model, "model").model_uri
