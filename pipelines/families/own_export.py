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


def export_text(model: om.OwnModel, path: Path, dynamo: bool = True) -> Path:
    """The classifier as a single-file ONNX graph, batch and sequence axes dynamic: through
    ``torch.export`` (``dynamo``; symbolic shapes) or the TorchScript tracer."""
    import copy

    import torch

    net = copy.deepcopy(model.net).to("cpu").float().eval()
    enc = model.encoder
    ids, mask = enc.pad(enc.ids(["an example", "another, longer example text here"]))
    names = ["input_ids", "attention_mask"]
    if dynamo:
        dims = {0: torch.export.Dim("batch"),
                1: torch.export.Dim("sequence", max=int(model.meta["max_length"]))}
        kwargs: dict[str, Any] = {"dynamo": True, "dynamic_shapes": (dims, dims)}
    else:
        axes = {n: {0: "batch", 1: "sequence"} for n in names}
        kwargs = {"dynamo": False, "dynamic_axes": {**axes, "logits": {0: "batch"}}}
    # traced with gradients on: torch's fused inference kernels (the TransformerEncoder fast
    # path, aten::_transformer_encoder_layer_fwd) have no ONNX export and are not taken then
    with warnings.catch_warnings(), torch.enable_grad(), ox._quiet():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (ids, mask), str(path), input_names=names,
                          output_names=["logits"], opset_version=17, **kwargs)
    if dynamo:  # torch.export writes the weights beside the graph: one file, as served
        import onnx

        onnx.save(onnx.load(str(path)), str(path), save_as_external_data=False)
        for extra in path.parent.glob(path.name + ".data"):
            extra.unlink()
    return path


def export_verified(model: om.OwnModel, path: Path) -> Path:
    """The first export (torch.export, then the tracer) that :func:`verified` accepts; else
    ValueError with each exporter's reason."""
    reasons = []
    for dynamo in (True, False):
        try:
            return verified(model, export_text(model, path, dynamo))
        except Exception as exc:  # noqa: BLE001 - exporters raise many types
            reasons.append(f"{'torch.export' if dynamo else 'tracer'}: "
                           f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    raise ValueError("no ONNX export of this module: " + "; ".join(reasons))


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
            kind = self.model.meta["kind"]
            built = ["fp32", *ONNX_VARIANTS] if kind == "text" else ["fp32"]
            raise ValueError(f"variant {name!r} is not built for own {kind} modules (built: "
                             f"{', '.join(built)})")
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
            self._onnx = export_verified(self.model, self.dir / "onnx.onnx")
        return self._onnx

    def log(self, variant: BuiltVariant, labels: list[str]) -> str:
        if isinstance(variant.artifact, Path):
            from pipelines.families.text_classifier_variants import _log_onnx

            return _log_onnx(variant, self.model.tokenizer, labels,
                             self.model.meta["max_length"])
        from pipelines.families.own_tracking import log_model

        return log_model(variant.artifact, "model").model_uri


#: texts of other batch sizes and lengths than the export's example: a graph that baked a shape
#: in (a traced Python int) fails or differs on them
CHECK_TEXTS = ("one", "a somewhat longer text than the others , to vary the sequence length",
               "three words here", "and a fourth one")


def verified(model: om.OwnModel, path: Path, tol: float = 1e-3) -> Path:
    """``path`` if ONNX Runtime gives the torch model's probabilities on :data:`CHECK_TEXTS`
    (another batch size and sequence length than the export's); else ValueError saying why
    (the variant is then skipped and the torch model served)."""
    clf = ox.OrtClassifier(path, model.tokenizer, model.meta["max_length"], 1)
    texts = list(CHECK_TEXTS)
    try:
        got = clf.predict_proba(texts)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own error types
        raise ValueError(f"the exported ONNX graph does not run on other batch sizes / lengths "
                         f"(the module's forward bakes a shape in while traced): "
                         f"{str(exc).splitlines()[0][:300]}") from None
    want = om.predict_proba(model, texts)
    diff = float(np.abs(got - want).max())
    if diff > tol:
        raise ValueError(f"the exported ONNX graph differs from torch by {diff:.2g} (> {tol}) "
                         "on other batch sizes / lengths: not served")
    return path
