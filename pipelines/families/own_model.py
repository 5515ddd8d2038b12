"""Own-module models in the pipeline: build one from the user's class (contract checked on one
training batch), train it, predict with it, save and load it (safetensors + the source file +
JSON, never pickle). Family-agnostic: a family hands over the data's facts, the training rows'
encoder and its ``kind``; ``own_runtime.py`` is the part that travels with the model."""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.families import own_runtime as rt
from pipelines.families import user_module as um

log = logging.getLogger(__name__)

#: the training hyperparameters of own modules (from scratch: a higher learning rate)
HYPERPARAMETERS: dict[str, Any] = {
    "learning_rate": 1e-3, "batch_size": 32, "weight_decay": 0.01, "warmup_ratio": 0.1,
}


@dataclass(frozen=True)
class OwnModel:
    """A user's network as a classifier (``net``: ``own_runtime.Classifier``), its ``meta``
    (``maas_module.json``), its source file's bytes and, for text, its tokenizer."""

    net: Any
    meta: dict[str, Any]
    source: bytes
    tokenizer: Any = None

    @property
    def labels(self) -> list[str]:
        return [str(x) for x in self.meta["labels"]]

    @functools.cached_property
    def encoder(self) -> rt.TextEncoder | None:
        """A ``TextEncoder`` over a copy of the tokenizer, made once (None for images)."""
        if self.tokenizer is None:
            return None
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
        return rt.TextEncoder(backend, self.meta["max_length"], self.meta["pad_token_id"])


Batch = tuple[Any, Any]  # (inputs tensor, attention mask or None)


def make(spec: um.ModuleSpec, kind: str, facts: dict[str, Any], init: dict[str, Any],
         labels: list[str], sample: Batch, sample_y: Any, seed: int,
         tokenizer: Any = None) -> OwnModel:
    """A new model of the user's class, checked on ``sample`` (one training batch) before any
    training: constructor kwargs, forward signature, output dtype/shape, a finite loss."""
    cls = um.load_user_class(spec)
    contract = um.constructor(cls, kind, init, spec.label, facts)
    net = um.construct(cls, contract, spec.label, seed)
    head = um.probe(net, contract, sample, len(labels), spec.label)
    model = rt.Classifier(net, contract.takes_mask, head, len(labels))
    um.check_loss(model, sample, sample_y, spec.label)
    meta = {"kind": kind, "class": spec.class_name, "module_file": spec.path.name,
            "module_sha256": spec.sha256, "init": contract.init,
            "takes_mask": contract.takes_mask, "head_dim": head, "labels": list(labels),
            **facts}
    if head:
        log.info("%s returns hidden states of width %d: a pooled linear head is added",
                 spec.label, head)
    return OwnModel(model, meta, spec.path.read_bytes(), tokenizer)


class OwnTrainer:
    """AdamW with linear warm-up/decay, cross-entropy, gradient clipping at norm 1; a forward
    that raises or a loss that is not finite stops the run (ModuleError), not just the trial."""

    precision = "fp32"

    def __init__(self, model: OwnModel, encode: Callable[[list[int]], Batch],
                 label_ids: list[int], params: dict[str, Any], seed: int, epochs: int,
                 lengths: list[int] | None = None) -> None:
        import torch

        from pipelines.families.text_classifier_model import adamw

        p = {**HYPERPARAMETERS, **params}
        self.model, self.encode, self.lengths = model, encode, lengths
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.net.to(self.device)
        self.y = torch.tensor(label_ids, dtype=torch.long)
        self.batch_size = int(p["batch_size"])
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer = adamw(model.net, float(p["learning_rate"]), float(p["weight_decay"]))
        total = max(1, math.ceil(len(self.y) / self.batch_size) * epochs)
        warm = int(total * float(p["warmup_ratio"]))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: (s + 1) / max(1, warm) if s < warm
            else max(0.0, (total - s) / max(1, total - warm)))
        self.epoch = 0

    def train_epoch(self, desc: str = "train") -> float:
        import torch

        from pipelines.progress import progress

        self.epoch += 1
        net = self.model.net.train()
        batches = self._batches()
        total, seen = 0.0, 0
        for n, idx in enumerate(progress(batches, desc=desc, leave=False, unit="batch")):
            loss = self._loss(net, idx, n)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            total += loss.item() * len(idx)
            seen += len(idx)
        net.eval()
        return total / max(seen, 1)

    def _batches(self) -> list[list[int]]:
        """Shuffled batches; with ``lengths`` (texts), each window of 50 batches is sorted by
        length first so that a batch pads little (then the batches are shuffled)."""
        import torch

        order = torch.randperm(len(self.y), generator=self.generator).tolist()
        if self.lengths is not None:
            window = self.batch_size * 50
            order = [i for w in range(0, len(order), window)
                     for i in sorted(order[w:w + window], key=self.lengths.__getitem__)]
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        shuffled = torch.randperm(len(batches), generator=self.generator).tolist()
        return [batches[i] for i in shuffled]

    def _loss(self, net: Any, idx: list[int], n: int) -> Any:
        import torch

        label = f"{self.model.meta['module_file']}:{self.model.meta['class']}"
        x, mask = self.encode(idx)
        x = x.to(self.device)
        mask = None if mask is None else mask.to(self.device)
        try:
            logits = net(x, mask)
        except Exception as exc:  # noqa: BLE001 - the user's forward
            raise um.ModuleError(f"model.module: {label}.forward raised {type(exc).__name__} "
                                 f"at epoch {self.epoch} batch {n}: {exc}") from None
        loss = torch.nn.functional.cross_entropy(logits.float(), self.y[idx].to(self.device))
        if not torch.isfinite(loss):
            raise um.ModuleError(f"model.module: {label}: the training loss became "
                                 f"{loss.item()} at epoch {self.epoch} batch {n}; lower "
                                 "learning_rate or check the forward for overflow")
        return loss


def predict_proba(model: OwnModel, inputs: list[Any], batch_size: int = 64) -> Any:
    model.net.eval()
    return rt.predict(model.net, model.encoder, inputs, batch_size)


def save(model: OwnModel, folder: Path) -> None:
    """The model folder (see ``own_runtime``): weights, meta, source, tokenizer."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    save_file(state, str(folder / rt.WEIGHTS_FILE))
    (folder / rt.META_FILE).write_text(json.dumps(model.meta, indent=2, sort_keys=True), "utf-8")
    (folder / rt.MODULE_FILE).write_bytes(model.source)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(folder)


def load(folder: Path) -> OwnModel:
    net, meta, where = rt.load(folder)
    tokenizer = None
    if meta["kind"] == "text":
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(where))
    _, source = rt.find_files(folder)
    return OwnModel(net, meta, source.read_bytes(), tokenizer)


def card_facts(cfg: Any, spec: um.ModuleSpec) -> dict[str, Any]:
    """The card's ``base_checkpoint`` section of an own module: trained from scratch, from this
    source file (sha256) with these constructor arguments."""
    return {"spec": f"module:{spec.label}", "from_scratch": True, "module": spec.label,
            "module_sha256": spec.sha256, "init": dict(cfg.model.init),
            "architecture": spec.class_name}
