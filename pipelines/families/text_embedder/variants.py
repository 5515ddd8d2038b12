"""The text embedder's compression variants (its :class:`~pipelines.families.base.Compressor`).

``onnx``: the encoder with its pooling head (and normalisation) exported as one graph, output
``embeddings``, fused by ONNX Runtime's transformer optimizer; ``onnx-int8``: that graph with
dynamic or static QDQ int8 (``compression.int8``). Each is measured through the bento's own
runtime (``bentos.text_embedder.maas_runtime``). The gate on them is the family's: mean cosine
with fp32 (``variant_floors``) and the retrieval metric within ``compression.max_accuracy_drop``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pipelines import onnx_variants as ox
from pipelines.families.base import BuiltVariant
from pipelines.families.text_embedder.model import EmbedModel, embed, forward


class EmbedClf:
    """A variant as compression measures it: ``predict_proba(texts or pairs)`` -> embeddings
    (a pair's two side by side)."""

    def __init__(self, runtime: str, fn) -> None:
        self.runtime, self._fn = runtime, fn

    def predict_proba(self, inputs: list[Any]):
        from pipelines.families.text_embedder.pairs import embed_pairs, is_pairs

        items = list(inputs)
        return embed_pairs(self._fn, items) if is_pairs(items) else self._fn(items)


class EmbedCompressor:
    def __init__(self, cfg, data, model: EmbedModel, workdir: Path) -> None:
        self.cfg, self.model, self.dir = cfg, model, workdir
        self.texts = data.train.text.tolist()  # int8 calibration (pairs: their first texts)
        workdir.mkdir(parents=True, exist_ok=True)
        self.threads = cfg.compression.threads or ox.cpu_cores()
        self._graphs: dict[str, Path] = {}
        self._inputs: list[str] = []

    def build(self, name: str) -> BuiltVariant:
        if name == "fp32":
            m = self.model
            return BuiltVariant("fp32", "torch", EmbedClf("torch", lambda t: embed(m, t, 32)),
                                _params(m.encoder), self._torch_size(), {**m.settings()},
                                artifact=m)
        if name not in ("onnx", "onnx-int8"):
            raise ValueError(f"the text embedder builds onnx and onnx-int8, not {name!r}")
        folder = self.graph(name)
        from bentos.text_embedder.maas_runtime import OrtEmbedRuntime

        rt = OrtEmbedRuntime(folder, threads=self.threads, forward_batch_size=32)
        q = self.cfg.compression.int8
        settings = {**self.model.settings(), "providers": rt.info["providers"]}
        if name == "onnx-int8":
            settings.update({"int8.mode": q.mode, "int8.per_channel": q.per_channel})
        return BuiltVariant(name, "onnxruntime", EmbedClf("onnxruntime", rt.embed),
                            _params(self.model.encoder),
                            (folder / "model.onnx").stat().st_size / 1e6, settings,
                            artifact=folder / "model.onnx")

    def log(self, variant: BuiltVariant, labels: list[str]) -> str:
        from pipelines.families.text_embedder import tracking

        if isinstance(variant.artifact, Path):
            return tracking.log_onnx(variant.artifact, self.model, variant.name, self._inputs)
        return tracking.log_model(variant.artifact, "model").model_uri

    def graph(self, name: str) -> Path:
        """The folder with ``model.onnx`` + tokenizer + ``maas_variant.json`` of ``name``."""
        if name in self._graphs:
            return self._graphs[name]
        folder = self.dir / name
        folder.mkdir(parents=True, exist_ok=True)
        if name == "onnx":
            raw = self.dir / "export.onnx"
            self._inputs = export(self.model, raw)
            ox.optimize(raw, folder / "model.onnx", self.model.encoder.config)
        else:
            src = self.graph("onnx") / "model.onnx"
            q = self.cfg.compression.int8
            calib = None
            if q.mode == "static":
                calib = ox.calibration_batches(self.model.tokenizer,
                                               self.texts[:q.calibration_rows],
                                               self.model.max_length, self._inputs)
            ox.quantize(src, folder / "model.onnx", mode=q.mode, per_channel=q.per_channel,
                        calibration=calib)
        self.model.tokenizer.save_pretrained(folder)
        meta = {"variant": name, "output_name": "embeddings", "input_names": self._inputs,
                **self.model.settings()}
        (folder / "maas_variant.json").write_text(json.dumps(meta, indent=2), "utf-8")
        self._graphs[name] = folder
        return folder

    def _torch_size(self) -> float:
        folder = self.dir / "fp32-torch"
        self.model.encoder.save_pretrained(folder, safe_serialization=True)
        return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6


def export(model: EmbedModel, path: Path) -> list[str]:
    """The encoder + pooling head as one ONNX graph (CPU fp32 copy, eager attention so ONNX
    Runtime's optimizer fuses it); returns the input names."""
    import torch

    enc_model = copy.deepcopy(model.encoder).to("cpu").float().eval()
    if hasattr(enc_model, "set_attn_implementation"):
        enc_model.set_attn_implementation("eager")
    pooled = EmbedModel(enc_model, model.tokenizer, model.pooling, model.normalize,
                        model.max_length)
    enc = model.tokenizer(["an example", "another, longer example text"], padding=True,
                          truncation=True, max_length=model.max_length, return_tensors="pt")
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in enc]

    class Head(torch.nn.Module):
        def forward(self, *args: Any):
            return forward(pooled, dict(zip(names, args, strict=True)))

    head = Head()
    head.add_module("encoder", enc_model)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    with torch.inference_mode():
        torch.onnx.export(head, tuple(enc[n] for n in names), str(path), input_names=names,
                          output_names=["embeddings"],
                          dynamic_axes={**axes, "embeddings": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return names


def _params(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))
