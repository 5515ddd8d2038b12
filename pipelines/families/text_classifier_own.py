"""The text family with ``model.module``: the user's own PyTorch module trained from scratch on
token ids from a tokenizer trained on the training split (``own_tokenizer.py``; type and
vocabulary size from ``model.tokenizer``, tunable as ``tokenizer.type`` /
``tokenizer.vocab_size``).
The constructor gets ``vocab_size``, ``num_labels``, ``max_length`` and ``pad_token_id`` where it
takes them by name; ``forward(input_ids, attention_mask)`` or ``forward(input_ids)``. The contract
and everything after training are the shared own-module code (``user_module.py``,
``own_model.py``, ``own_tracking.py``, ``own_export.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.families import user_module as um


class OwnText:
    """What :class:`~pipelines.families.text_classifier.TextClassifier` delegates to when
    ``model.module`` is set."""

    kind = "text"

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self._tokenizers: dict[tuple[str, int], Any] = {}

    @property
    def spec(self) -> um.ModuleSpec:
        return um.spec_of(self.cfg)

    def check(self) -> None:
        um.check_config(self.cfg, self.kind)

    def tokenizer(self, texts: list[str], params: dict[str, Any]) -> Any:
        """The tokenizer for these trial ``params``, trained once per (type, vocabulary size)."""
        from pipelines.families.own_tokenizer import train_tokenizer

        t = self.cfg.model.tokenizer
        key = (str(params.get("tokenizer.type", t.type)),
               int(params.get("tokenizer.vocab_size", t.vocab_size)))
        if key not in self._tokenizers:
            self._tokenizers[key] = train_tokenizer(texts, key[0], key[1], t.min_frequency,
                                                    self.cfg.model.max_length)
        return self._tokenizers[key]

    def trainer(self, data: Any, params: dict[str, Any], seed: int) -> Any:
        import torch

        from pipelines.families import own_model as om
        from pipelines.families import own_runtime as rt

        texts, ids = data.train.text.tolist(), data.ids(data.train)
        tok = self.tokenizer(texts, params)
        max_length = self.cfg.model.max_length
        facts = {"vocab_size": len(tok), "num_labels": len(data.id2label),
                 "max_length": max_length, "pad_token_id": int(tok.pad_token_id)}
        enc = rt.TextEncoder(tok.backend_tokenizer.__class__.from_str(
            tok.backend_tokenizer.to_str()), max_length, facts["pad_token_id"])
        rows = enc.ids(texts)
        labels = [data.id2label[i] for i in range(len(data.id2label))]
        first = list(range(min(len(rows), int(params.get("batch_size", 32)))))
        model = om.make(self.spec, self.kind, facts, um.init_of(self.cfg, params), labels,
                        enc.pad([rows[i] for i in first]),
                        torch.tensor([ids[i] for i in first]), seed, tok)
        return om.OwnTrainer(model, lambda idx: enc.pad([rows[i] for i in idx]), ids, params,
                             seed, self.cfg.tuning.max_epochs, lengths=[len(r) for r in rows])

    def save(self, model: Any, folder: Path) -> None:
        from pipelines.families import own_model as om

        om.save(model, folder)

    def load(self, folder: Path) -> Any:
        from pipelines.families import own_model as om

        return om.load(folder)

    def log_model(self, model: Any, name: str, input_example: Any | None = None) -> Any:
        from pipelines.families.own_tracking import log_model

        return log_model(model, name, input_example)

    def compressor(self, model: Any, workdir: Path) -> Any:
        from pipelines.families.own_export import OwnCompressor

        return OwnCompressor(self.cfg, model, workdir)

    def card_facts(self) -> dict[str, Any]:
        from pipelines.families.own_model import card_facts

        t = self.cfg.model.tokenizer
        return {**card_facts(self.cfg, self.spec), "max_length": self.cfg.model.max_length,
                "tokenizer": {"type": t.type, "vocab_size": t.vocab_size,
                              "trained_on": "the training split"}}
