"""The text embedder's model: a transformers encoder, its tokenizer and a pooling head (mean, CLS
or max over the last hidden state under the attention mask; optional L2 normalisation).

Weights are read and written as safetensors only; the pooling settings travel beside them in
``maas_embedder.json``. Mean pooling + normalisation of the packaged MiniLM-L6 is what
sentence-transformers' ``encode`` computes for that checkpoint.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

POOLINGS = ("mean", "cls", "max")
SETTINGS_FILE = "maas_embedder.json"


@dataclass(frozen=True)
class EmbedModel:
    """An encoder with its pooling head. ``stamp`` names this state of the weights (a trainer
    hands out a new one per epoch), so a retrieval index computed with it can be reused."""

    encoder: Any
    tokenizer: Any
    pooling: str = "mean"
    normalize: bool = True
    max_length: int = 128
    stamp: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def dim(self) -> int:
        return int(self.encoder.config.hidden_size)

    def settings(self) -> dict[str, Any]:
        return {"pooling": self.pooling, "normalize": self.normalize,
                "max_length": self.max_length, "dim": self.dim}


def pool(hidden, mask, mode: str):
    """(batch, dim) pooled from the last hidden state ``hidden`` (batch, seq, dim) under the
    attention ``mask`` (batch, seq) (torch tensors)."""
    import torch

    if mode == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "mean":
        return (hidden * m).sum(1) / torch.clamp(m.sum(1), min=1e-9)
    if mode == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).max(1).values
    raise ValueError(f"pooling must be one of {POOLINGS}, got {mode!r}")


def load_encoder(folder: Path):
    """(tokenizer, encoder) of a transformers checkpoint folder (safetensors only, offline)."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    return (AutoTokenizer.from_pretrained(folder),
            AutoModel.from_pretrained(folder, use_safetensors=True))


def forward(model: EmbedModel, enc: dict[str, Any], pooling: str | None = None):
    """Pooled (and, if the model normalises, unit-length) embeddings of a tokenised batch."""
    import torch

    hidden = model.encoder(**enc).last_hidden_state
    out = pool(hidden, enc["attention_mask"], pooling or model.pooling)
    return torch.nn.functional.normalize(out, dim=-1) if model.normalize else out


def embed(model: EmbedModel, texts: list[str], batch_size: int = 64,
          desc: str | None = None) -> np.ndarray:
    """float32 (len(texts), dim), rows in input order; batches of similar length."""
    import torch

    from pipelines.progress import progress

    model.encoder.eval()
    device = next(model.encoder.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), model.dim), dtype=np.float32)
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with torch.inference_mode():
        for idx in progress(chunks, enabled=desc is not None, desc=desc or "embed",
                            leave=False, unit="batch"):
            enc = model.tokenizer([texts[i] for i in idx], padding="longest", truncation=True,
                                  max_length=model.max_length, return_tensors="pt").to(device)
            out[idx] = forward(model, dict(enc)).float().cpu().numpy()
    return out


def save(model: EmbedModel, folder: Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(folder, safe_serialization=True)
    model.tokenizer.save_pretrained(folder)
    (folder / SETTINGS_FILE).write_text(json.dumps(model.settings(), indent=2), "utf-8")


def load(folder: Path) -> EmbedModel:
    folder = Path(folder)
    settings = json.loads((folder / SETTINGS_FILE).read_text("utf-8"))
    tokenizer, encoder = load_encoder(folder)
    return EmbedModel(encoder, tokenizer, settings["pooling"], bool(settings["normalize"]),
                      int(settings["max_length"]))
