"""Model registry on MLflow 3 aliases: register with lineage, gate, promote, roll back.

See :mod:`registry.promotion` for the tag layout kept on each model version.
"""

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
