"""Model registry on MLflow 3 aliases: register with lineage, gate, promote, roll back.

One job per module: :mod:`registry.tags` (the tag layout kept on each model version),
:mod:`registry.registration` (``register``), :mod:`registry.aliases` (``promote``, ``rollback``),
:mod:`registry.queries` (``champion``, ``describe``), :mod:`registry.versions` (shared client
helpers, :class:`RegistryError`), :mod:`registry.history` for the champion alias history,
:mod:`registry.card` (pure rendering) and :mod:`registry.card_store` (attach / load) for model
cards, :mod:`registry.gate` for the pure gates (challenger vs champion, which variant to serve) and
:mod:`registry.locks` for the database locks (by URL and key) that promotion and the pipelines
take.
"""

from registry.aliases import promote, rollback
from registry.card import card_json, render_card
from registry.card_store import attach_card, current_card, live_facts, load_card
from registry.gate import (
    REFERENCE_VARIANT,
    Decision,
    VariantChoice,
    choose_variant,
    should_promote,
    with_drift,
)
from registry.history import format_history, history
from registry.queries import champion, describe, format_table
from registry.registration import register
from registry.tags import CHALLENGER, CHAMPION
from registry.versions import RegistryError

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "REFERENCE_VARIANT",
    "Decision",
    "RegistryError",
    "VariantChoice",
    "attach_card",
    "card_json",
    "champion",
    "choose_variant",
    "current_card",
    "describe",
    "format_history",
    "format_table",
    "history",
    "live_facts",
    "load_card",
    "promote",
    "register",
    "render_card",
    "rollback",
    "should_promote",
    "with_drift",
]
