"""Model registry on MLflow 3 aliases: register with lineage, gate, promote, roll back.

See :mod:`registry.promotion` for the tag layout kept on each model version,
:mod:`registry.history` for the champion alias history, :mod:`registry.card` for model cards and
:mod:`registry.gate` for the pure gates (challenger vs champion, which variant to serve) and
:mod:`registry.locks` for the database locks (by URL and key) that promotion and the pipelines take.
"""

from registry.card import (
    attach_card,
    card_json,
    current_card,
    live_facts,
    load_card,
    render_card,
)
from registry.gate import REFERENCE_VARIANT, VariantChoice, choose_variant, with_drift
from registry.history import format_history, history
from registry.promotion import (
    CHALLENGER,
    CHAMPION,
    Decision,
    RegistryError,
    champion,
    describe,
    format_table,
    promote,
    register,
    rollback,
    should_promote,
)

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
