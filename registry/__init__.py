"""Model registry on MLflow 3 aliases: register with lineage, gate, promote, roll back.

See :mod:`registry.promotion` for the tag layout kept on each model version and
:mod:`registry.gate` for the pure gates (challenger vs champion, which variant to serve).
"""

from registry.gate import REFERENCE_VARIANT, VariantChoice, choose_variant
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
    "REFERENCE_VARIANT",
    "VariantChoice",
    "choose_variant",
    "CHAMPION",
    "Decision",
    "RegistryError",
    "champion",
    "describe",
    "format_table",
    "promote",
    "register",
    "rollback",
    "should_promote",
]
