"""ONNX variants of a transformers text classifier (the text family's; sessions as the serving
runtime table, ``bentos.runtimes``, sets them up): export, graph fusion, int8 quantisation, and
an ONNX Runtime session that predicts probabilities.

Everything here is a maintained library's public API: ``torch.onnx.export`` (TorchScript exporter,
opset 17), ONNX Runtime's transformer optimizer (fuses attention, GELU and layer norms for
BERT-style encoders) and ``onnxruntime.quantization`` (dynamic, or static QDQ calibrated on
training rows). Files are plain ONNX (no external data, nothing pickled).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: model types ONNX Runtime's transformer optimizer fuses as "bert" (encoder-only models)
_FUSABLE = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert"}
_DEFAULT_TENSOR_FLOAT = 1  # onnx.TensorProto.FLOAT: type for tensors made by fused contrib ops


def cpu_cores() -> int:
    from bentos.runtimes import cpu_cores as cores

    return cores()


def export(model, tokenizer, path: Path, max_length: int) -> list[str]:
    """Export ``model`` (a transformers sequence classifier) to ``path``; returns the input names.

    The export runs on a CPU fp32 copy with eager attention: the graph then has the attention
    pattern ONNX Runtime's optimizer recognises and fuses (SDPA exports do not fuse)."""
    import torch

    m = copy.deepcopy(model).to("cpu").float().eval()
    if hasattr(m, "set_attn_implementation"):
        m.set_attn_implementation("eager")
    enc = tokenizer(["an example", "another, longer example text"], padding=True,
                    truncation=True, max_length=max_length, return_tensors="pt")
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in enc]
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    with torch.inference_mode():
        torch.onnx.export(m, tuple(enc[n] for n in names), str(path), input_names=names,
                          output_names=["logits"], dynamic_axes={**axes, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return names


def optimize(src: Path, dst: Path, config) -> dict[str, int]:
    """Fuse the graph with ONNX Runtime's transformer optimizer; returns the fused-op counts.
    A model type it does not know is copied unchanged (the session still applies ORT's generic
    graph optimisations)."""
    import shutil

    if getattr(config, "model_type", None) not in _FUSABLE:
        shutil.copyfile(src, dst)
        return {}
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet():
        opt = optimize_model(str(src), model_type="bert",
                             num_heads=int(config.num_attention_heads),
                             hidden_size=int(config.hidden_size), opt_level=1)
    opt.save_model_to_file(str(dst))
    return {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}


def quantize(src: Path, dst: Path, *, mode: str, per_channel: bool,
             calibration: list[dict[str, np.ndarray]] | None = None) -> None:
    """int8 weights (dynamic: activations quantised at run time) or weights and activations
    (static QDQ, activation ranges calibrated on ``calibration`` batches)."""
    from onnxruntime import quantization as q

    extra = {"DefaultTensorType": _DEFAULT_TENSOR_FLOAT}
    with _quiet():
        _quantize(q, src, dst, mode, per_channel, calibration, extra)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's optimizer and quantiser log every node and tensor at INFO (some on the
    root logger): keep them out of the run's output; warnings still show."""
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _quantize(q, src: Path, dst: Path, mode: str, per_channel: bool,
              calibration: list[dict[str, np.ndarray]] | None, extra: dict[str, Any]) -> None:
    if mode == "dynamic":
        q.quantize_dynamic(str(src), str(dst), weight_type=q.QuantType.QInt8,
                           per_channel=per_channel, extra_options=extra)
        return
    if not calibration:
        raise ValueError("static int8 quantisation needs calibration batches")
    reader = _Calibration(calibration)
    # biases stay fp32: int32 bias scales need every producer's range, which the fused graph's
    # contrib ops (e.g. the pooler's Gather after EmbedLayerNormalization) do not give
    q.quantize_static(str(src), str(dst), reader, quant_format=q.QuantFormat.QDQ,
                      per_channel=per_channel, weight_type=q.QuantType.QInt8,
                      activation_type=q.QuantType.QUInt8,
                      extra_options={**extra, "QuantizeBias": False})


class _Calibration:
    """``onnxruntime.quantization.CalibrationDataReader`` over prepared input batches."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:  # some ORT versions call it between calibration passes
        pass


def available_providers() -> list[str]:
    """Execution providers to use, fastest first: TensorRT, CUDA when present, always CPU."""
    from bentos.runtimes import ort_providers

    return ort_providers()


class OrtClassifier:
    """An ONNX Runtime session that maps texts to softmax probabilities, through the bento
    runtime's own session settings, tokenisation and softmax (so the pipeline measures and scores
    what will be served)."""

    runtime = "onnxruntime"

    def __init__(self, path: Path, tokenizer, max_length: int, threads: int | None = None,
                 providers: list[str] | None = None) -> None:
        from bentos.runtimes import runtime

        self.session = runtime(self.runtime).session(path, threads or cpu_cores(),
                                                     providers or ["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.tokenizer, self.max_length = tokenizer, max_length

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """One forward pass over ``texts`` (padded to the longest); rows in input order."""
        from bentos.text_classifier.maas_runtime import encode_chunks, session_feed, softmax_rows

        [(idx, arrays)] = encode_chunks(self.tokenizer, list(texts), self.max_length, len(texts))
        logits = self.session.run(["logits"], session_feed(arrays, self.inputs))[0]
        out = np.empty(logits.shape, dtype=np.float32)
        out[idx] = softmax_rows(logits)
        return out


def calibration_batches(tokenizer, texts: list[str], max_length: int, inputs: list[str],
                        batch_size: int = 16) -> list[dict[str, np.ndarray]]:
    """Static quantisation's calibration inputs: ``texts`` in length-sorted batches, tokenised
    as the service tokenises."""
    from bentos.text_classifier.maas_runtime import encode_chunks, session_feed

    return [session_feed(arrays, inputs)
            for _, arrays in encode_chunks(tokenizer, list(texts), max_length, batch_size)]
