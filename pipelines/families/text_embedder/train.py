"""Contrastive fine-tuning of the embedder with in-batch negatives.

Labelled texts: supervised contrastive loss (texts of the same label in a batch are each other's
positives, every other text a negative); pairs ``(a, b)``: symmetric InfoNCE (``pairs.py``);
cosine similarities over a temperature. ``epochs`` (a
hyperparameter, at most ``tuning.max_epochs``) sets how many epochs train; later epochs of the
trial leave the model as it is, so ``epochs: 0`` evaluates the pre-trained encoder unchanged.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from pipelines.families.text_classifier_model import _autocast
from pipelines.families.text_embedder.model import EmbedModel, forward, load_encoder
from pipelines.families.text_embedder.pairs import info_nce

log = logging.getLogger(__name__)

HYPERPARAMETERS = {
    "pooling": "mean",
    "learning_rate": 3e-5,
    "temperature": 0.05,
    "batch_size": 32,
    "epochs": 1,
    "weight_decay": 0.0,
    "warmup_ratio": 0.1,
}


def supcon_loss(z, labels, temperature: float):
    """Supervised contrastive loss of unit vectors ``z`` (batch, dim) with ``labels`` (batch)."""
    import torch

    sim = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    logprob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    n_pos = pos.sum(1)
    keep = n_pos > 0
    if not keep.any():
        return sim.new_zeros(())
    per_row = logprob.masked_fill(~pos, 0.0).sum(1)[keep] / n_pos[keep]
    return -per_row.mean()


class ContrastiveTrainer:
    """One trial's fine-tune (the contract's ``Trainer``); CPU fp32 or CUDA autocast."""

    def __init__(self, checkpoint: Path, params: dict[str, Any], texts: list[Any],
                 label_ids: list[int], max_length: int, normalize: bool, seed: int,
                 max_epochs: int) -> None:
        import torch
        from transformers import get_linear_schedule_with_warmup

        from pipelines.families.text_classifier_model import adamw, amp_dtype, precision_name

        p = {**HYPERPARAMETERS, **params}
        torch.manual_seed(seed)
        tokenizer, encoder = load_encoder(checkpoint)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        encoder.to(self.device)
        self.amp_dtype = amp_dtype(self.device)
        self.precision = precision_name(self.amp_dtype)
        self._parts = (encoder, tokenizer, str(p["pooling"]), normalize, max_length)
        self.texts, self.labels = list(texts), list(label_ids)
        self.pairs = bool(self.texts) and isinstance(self.texts[0], tuple)  # (a, b) positives
        self.batch_size, self.temperature = int(p["batch_size"]), float(p["temperature"])
        self.epochs = max(0, min(int(p["epochs"]), max_epochs))
        self.done, self.last_loss = 0, 0.0
        self.generator = torch.Generator().manual_seed(seed)
        steps = max(1, math.ceil(len(self.texts) / self.batch_size) * self.epochs)
        self.optimizer = adamw(encoder, float(p["learning_rate"]), float(p["weight_decay"]))
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, int(steps * float(p["warmup_ratio"])), steps)
        self._model = EmbedModel(*self._parts)

    @property
    def model(self) -> EmbedModel:
        return self._model

    def _loss(self, idx: list[int], enc):
        """The batch's loss: supervised contrastive (labels), InfoNCE (pairs: a, b interleaved)."""
        import torch

        with _autocast(self.device, self.amp_dtype):
            z = forward(self._model, dict(enc))
        z = torch.nn.functional.normalize(z.float(), dim=-1)
        if self.pairs:
            return info_nce(z[0::2], z[1::2], self.temperature)
        labels = torch.tensor([self.labels[i] for i in idx], device=self.device)
        return supcon_loss(z, labels, self.temperature)

    def train_epoch(self, desc: str = "train") -> float:
        """One epoch of the contrastive loss; after ``epochs`` epochs, nothing (the last loss)."""
        if self.done >= self.epochs:
            return self.last_loss
        import torch

        from pipelines.progress import progress

        encoder, tokenizer = self._parts[0], self._parts[1]
        encoder.train()
        order = torch.randperm(len(self.texts), generator=self.generator).tolist()
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        total, seen = 0.0, 0
        for idx in progress([b for b in batches if len(b) > 1], desc=desc, leave=False,
                            unit="batch"):
            batch = [t for i in idx for t in (self.texts[i] if self.pairs else (self.texts[i],))]
            enc = tokenizer(batch, padding="longest", truncation=True,
                            max_length=self._parts[4], return_tensors="pt").to(self.device)
            loss = self._loss(idx, enc)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            total += float(loss.item()) * len(idx)
            seen += len(idx)
        self.done += 1
        self.last_loss = total / max(seen, 1)
        self._model = EmbedModel(*self._parts)  # a new stamp: the weights changed
        return self.last_loss
