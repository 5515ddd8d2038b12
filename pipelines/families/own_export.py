"""Compression variants of own text modules (the family's ``Compressor``): ``onnx`` (the
classifier exported with inputs ``input_ids`` / ``attention_mask`` and output ``logits``) and
``onnx-int8`` (its dynamic int8 quantisation). A module that cannot be exported (control flow
on values, an operator ONNX lacks) makes the variant fail with the exporter's reason, recorded as
skipped; the torch fp32 model is then served. Own image modules build fp32 only, for now."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import onnx_variants as ox
from pipelines.families import own_model as om
from pipelines.families.base import BuiltVariant

ONNX_VARIANTS = ("onnx", "onnx-int8")


class OwnTorch:
    """The fp32 own-module model measured as it is served (torch)."""

    runtime = "torch"

    def __init__(self, model: om.OwnModel) -> None:
        self.model = model

    def predict_proba(self, inputs: list[Any]) -> np.ndarray:
        return om.predict_proba(self.model, inputs, batch_size=max(1, len(inputs)))


def export_text(model: om.OwnModel, path: Path) -> Path:
    """The classifier as a single-file ONNX graph (batch and sequence axes dynamic)."""
    import copy

    import torch

    net = copy.deepcopy(model.net).to("cpu").float().eval()
    enc = model.encoder()
    ids, mask = enc.pad(enc.ids(["an example", "another, longer example text here"]))
    names = ["input_ids", "attention_mask"]
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    # traced with gradients on: torch's fused inference kernels (the TransformerEncoder fast
    # path, aten::_transformer_encoder_layer_fwd) have no ONNX export and are not taken then
    with warnings.catch_warnings(), torch.enable_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (ids, mask), str(path), input_names=names,
                          output_names=["logits"], dynamic_axes={**axes, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return path


class OwnCompressor:
    """Builds ``fp32`` / ``onnx`` / ``onnx-int8`` of an own text module (fp32 only for images)."""

    def __init__(self, cfg: Any, model: om.OwnModel, workdir: Path) -> None:
        self.cfg, self.model, self.dir = cfg, model, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.threads = cfg.compression.threads or ox.cpu_cores()
        self._onnx: Path | None = None

    def build(self, name: str) -> BuiltVariant:
        params = int(sum(p.numel() for p in self.model.net.parameters()))
        if name == "fp32":
            return BuiltVariant(name, "torch", OwnTorch(self.model), params, params * 4 / 1e6,
                                artifact=self.model)
        if self.model.meta["kind"] != "text" or name not in ONNX_VARIANTS:
            raise ValueError(f"variant {name!r} is not built for own {self.model.meta['kind']} "
                             f"modules (they get: fp32"
                             f"{', ' + ', '.join(ONNX_VARIANTS) if self.model.meta['kind'] == 'text' else ''})")
        path = self._graph()
        settings: dict[str, Any] = {}
        if name == "onnx-int8":
            q = self.cfg.compression.int8
            out = self.dir / "onnx-int8.onnx"
            ox.quantize(path, out, mode="dynamic", per_channel=q.per_channel)
            path, settings = out, {"int8.mode": "dynamic", "int8.per_channel": q.per_channel}
        clf = ox.OrtClassifier(path, self.model.tokenizer, self.model.meta["max_length"],
                               self.threads, ox.available_providers())
        return BuiltVariant(name, "onnxruntime", clf, params, path.stat().st_size / 1e6,
                            {**settings, "providers": clf.session.get_providers()},
                            artifact=path)

    def _graph(self) -> Path:
        if self._onnx is None:
            self._onnx = export_text(self.model, self.dir / "onnx.onnx")
        return self._onnx

    def log(self, variant: BuiltVariant, labels: list[str]) -> str:
        if isinstance(variant.artifact, Path):
            from pipelines.families.text_classifier_variants import _log_onnx

            return _log_onnx(variant, self.model.tokenizer, labels,
                             self.model.meta["max_length"])
        from pipelines.families.own_tracking import log_model

        return log_model(variant.artifact, "model").model_uri
