"""A user's own PyTorch module at run time: load its class from a file, wrap it, predict with it.

Standalone (stdlib, torch, safetensors, numpy, tokenizers): this file travels with every
own-module model (MLflow ``code_paths``; in the bento it is the model's own file), and the MLflow
pyfunc and the bento services load it by file path, so a fresh process needs neither MaaS nor the
user's folder. The user's source is loaded by path too (``importlib``, under a module name made
from its sha256); nothing is added to ``sys.path`` and nothing is unpickled.

A saved model is a folder: ``model.safetensors`` (the :class:`Classifier`'s state dict),
``maas_module.json`` (:data:`META_FILE`: class name, constructor kwargs, forward mode, head,
labels, input facts, the source's sha256), the user's source as ``maas_user_module.py`` and,
for text, the tokenizer (``tokenizer.json``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

META_FILE = "maas_module.json"
WEIGHTS_FILE = "model.safetensors"
MODULE_FILE = "maas_user_module.py"
TOKENIZER_FILE = "tokenizer.json"


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_class(path: str | Path, class_name: str) -> Any:
    """``class_name`` from the Python file ``path``, imported by path under a name made from the
    file's sha256 (the same source is imported once per process). Import errors propagate."""
    path = Path(path)
    name = f"maas_user_{sha256_file(path)[:16]}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"{path} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and typing look their module up by name
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return getattr(module, class_name)


def as_tensor(out: Any) -> Any:
    """The tensor in a forward's output: itself, ``.logits``, ``["logits"]`` or the first item of
    a tuple/list (the conventions of plain modules and transformers models)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"forward returned {type(out).__name__}, not a tensor (nor a tuple, dict or "
                    "object holding 'logits')")


class Classifier(nn.Module):
    """The user's network ``net`` as a classifier: ``forward(x, mask=None) -> logits``.

    ``takes_mask``: the network's forward takes ``(input_ids, attention_mask)`` (else only its
    first input). ``head_dim``: the network returns hidden states of that width (``[B, H]`` or
    ``[B, T, H]``, mean-pooled over the unmasked tokens) and a linear head maps them to the
    classes; None: the network returns the logits itself."""

    def __init__(self, net: nn.Module, takes_mask: bool, head_dim: int | None,
                 num_labels: int) -> None:
        super().__init__()
        self.net = net
        self.takes_mask = takes_mask
        self.head = nn.Linear(head_dim, num_labels) if head_dim else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        out = as_tensor(self.net(x, mask) if self.takes_mask else self.net(x))
        if self.head is None:
            return out
        if out.dim() == 3:
            if mask is None:
                out = out.mean(dim=1)
            else:
                m = mask.unsqueeze(-1).to(out.dtype)
                out = (out * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        return self.head(out)


def build(cls: Any, meta: dict[str, Any]) -> Classifier:
    """An untrained :class:`Classifier` of ``cls`` as ``meta`` describes it."""
    net = cls(**meta["init"])
    return Classifier(net, bool(meta["takes_mask"]), meta.get("head_dim"), len(meta["labels"]))


def find_files(root: str | Path) -> tuple[Path, Path]:
    """(the folder holding ``maas_module.json``, the user's source) under ``root`` (a saved
    folder, or an MLflow model whose source sits in ``code/``)."""
    root = Path(root)
    metas = sorted(root.rglob(META_FILE))
    sources = sorted(root.rglob(MODULE_FILE))
    if not metas or not sources:
        raise FileNotFoundError(f"{root}: no {META_FILE} / {MODULE_FILE} (not a MaaS own-module "
                                "model)")
    return metas[0].parent, sources[0]


def load(root: str | Path) -> tuple[Classifier, dict[str, Any], Path]:
    """(classifier in eval mode, meta, its folder) of a model saved under ``root``."""
    from safetensors.torch import load_file

    folder, source = find_files(root)
    meta = json.loads((folder / META_FILE).read_text("utf-8"))
    if sha256_file(source) != meta["module_sha256"]:
        raise ValueError(f"{source}: sha256 differs from the one recorded in {META_FILE}")
    model = build(load_class(source, meta["class"]), meta)
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return model.eval(), meta, folder


class TextEncoder:
    """Texts -> ``(input_ids, attention_mask)`` int64 tensors padded to the longest text, with a
    ``tokenizers`` tokenizer (the one trained with the model), cut at ``max_length`` tokens."""

    def __init__(self, tokenizer: Any, max_length: int, pad_id: int) -> None:
        self.tok, self.max_length, self.pad_id = tokenizer, int(max_length), int(pad_id)
        self.tok.no_padding()
        self.tok.enable_truncation(self.max_length)

    def ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids or [self.pad_id] for e in self.tok.encode_batch(list(texts))]

    def pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        return ids, mask


def probabilities(model: Classifier, batches: Any) -> Any:
    """Softmax rows (numpy float32) of ``model`` over ``batches`` of ``(x, mask or None)``."""
    import numpy as np

    out = []
    with torch.inference_mode():
        for x, mask in batches:
            out.append(torch.softmax(model(x, mask).float(), dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


class Predictor:
    """A saved own-module model for serving: ``probabilities(inputs)`` (texts, or float arrays
    ``(C, S, S)``), ``labels``, ``max_tokens`` and ``info`` as the MaaS services expect."""

    name = "torch"

    def __init__(self, root: str | Path, threads: int | None = None, batch_size: int = 32,
                 max_tokens: int | None = None) -> None:
        if threads:
            torch.set_num_threads(int(threads))
        self.model, self.meta, folder = load(root)
        self.kind = self.meta["kind"]
        self.labels = [str(x) for x in self.meta["labels"]]
        self.batch_size = max(1, int(batch_size))
        self.max_tokens = min(int(max_tokens or 1 << 30), int(self.meta.get("max_length") or 512))
        self.encoder = None
        if self.kind == "text":
            from tokenizers import Tokenizer

            self.encoder = TextEncoder(Tokenizer.from_file(str(folder / TOKENIZER_FILE)),
                                       self.max_tokens, self.meta["pad_token_id"])
        self.info = {"runtime": "torch", "device": "cpu", "dtype": "float32", "quantize": False,
                     "threads": torch.get_num_threads(), "torch_threads": torch.get_num_threads(),
                     "attention": None, "providers": [], "max_tokens": self.max_tokens,
                     "forward_batch_size": self.batch_size, "module": self.meta["class"],
                     "module_sha256": self.meta["module_sha256"]}

    def probabilities(self, inputs: list[Any]) -> list[list[float]]:
        return self.proba(inputs).tolist()

    def proba(self, inputs: list[Any]) -> Any:
        return predict(self.model, self.encoder, inputs, self.batch_size)


def predict(model: Classifier, encoder: TextEncoder | None, inputs: list[Any],
            batch_size: int) -> Any:
    """Softmax rows of ``inputs`` (texts with ``encoder``, sorted by length so each batch pads
    little; else float arrays), in input order."""
    import numpy as np

    device = next(model.parameters()).device
    if encoder is None:
        x = torch.from_numpy(np.asarray(inputs, dtype=np.float32))
        return probabilities(model, ((x[i:i + batch_size].to(device), None)
                                     for i in range(0, len(x), batch_size)))
    rows = encoder.ids(list(inputs))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    probs = probabilities(model, (tuple(t.to(device) for t in encoder.pad([rows[i] for i in c]))
                                  for c in chunks))
    out = np.empty_like(probs)
    out[[i for c in chunks for i in c]] = probs
    return out
