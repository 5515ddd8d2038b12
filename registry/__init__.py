"""Model registry on MLflow 3 aliases: register with lineage, gate, promote, roll back.

One job per module: :mod:`registry.tags` (the tag layout kept on each model version),
:mod:`registry.registration` (``register``), :mod:`registry.aliases` (``promote``, ``rollback``),
:mod:`registry.queries` (``champion``, ``describe``), :mod:`registry.versions` (shared client
helpers, :class:`RegistryError`), :mod:`registry.alias_history` for the champion alias history,
:mod:`registry.card` (pure rendering) and :mod:`registry.card_store` (attach / load) for model
cards, :mod:`registry.gate` for the pure gates (challenger vs champion, which variant to serve) and
:mod:`registry.locks` for the database locks (by URL and key) that promotion and the pipelines
take.

The names below are loaded on first use (PEP 562): ``import registry.locks`` (what a lock-taking
process or ``maas --help`` needs) does not import MLflow.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module that defines it
_HOME = {
    "promote": "aliases", "rollback": "aliases",
    "card_json": "card", "render_card": "card",
    "attach_card": "card_store", "current_card": "card_store", "live_facts": "card_store",
    "load_card": "card_store",
    "REFERENCE_VARIANT": "gate", "Decision": "gate", "VariantChoice": "gate",
    "choose_variant": "gate", "should_promote": "gate", "with_drift": "gate",
    "format_history": "alias_history", "history": "alias_history",
    "champion": "queries", "describe": "queries", "format_table": "queries",
    "register": "registration",
    "CHALLENGER": "tags", "CHAMPION": "tags",
    "RegistryError": "versions",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'registry' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"registry.{_HOME[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOME})
