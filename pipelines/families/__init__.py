"""Model families: one module per family, registered by name here.

A family module provides (see ``text_classifier.py``):
``HYPERPARAMETERS`` (names a search space may use), ``resolve_checkpoint(spec) -> Path``,
``Trainer(checkpoint, id2label, params, texts, label_ids, max_length, seed)`` with
``train_epoch(desc) -> float`` and ``.model``/``.tokenizer``, ``predict_proba(model, tokenizer,
texts, max_length, batch_size) -> ndarray``, ``save(model, tokenizer, folder)``, ``load(folder)``,
``log_model(model, tokenizer, name, input_example) -> ModelInfo``, ``load_logged(uri)`` and
``labels_of(model) -> list[str]``. Adding a family = one new module + one line below.
"""

from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES: dict[str, str] = {
    "text_classifier": "pipelines.families.text_classifier",
}


def get_family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[name])
