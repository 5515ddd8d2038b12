"""The history of the ``champion`` alias: every move, from the records on the model versions.

MLflow keeps no history of alias moves. :func:`registry.aliases.promote` leaves one JSON
``maas.promotion_attempt.*`` record per call on the version (the moves are the ones with outcome
``promoted``, or ``superseded`` when a concurrent promotion won right after) and
:func:`registry.aliases.rollback` one ``maas.rollback.*`` record on the version it restores.
The record keys carry a microsecond UTC timestamp, so sorting by key is time order.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow

from registry.tags import TAG_ATTEMPT_PREFIX, TAG_ROLLBACK_PREFIX
from registry.versions import get_model, search_versions


def history(name: str) -> list[dict[str, Any]]:
    """Every move of ``champion`` of ``name``, oldest first: ``at`` (ISO UTC), ``actor``,
    ``event`` (``promote``, ``superseded`` = moved but lost a concurrent race, ``rollback``),
    ``from`` / ``to`` (versions; "" = none) and ``reason`` (the gate's, or why it was forced).
    Unknown models raise :class:`registry.versions.RegistryError`."""
    client = mlflow.MlflowClient()
    get_model(client, name)
    events: list[tuple[str, dict[str, Any]]] = []
    for mv in search_versions(client, name):
        for key, value in (mv.tags or {}).items():
            event = _history_event(key, value, str(mv.version))
            if event is not None:
                events.append((key.split(".", 2)[-1], event))  # "<ts>-<pid>-<r>" sorts by time
    return [e for _, e in sorted(events, key=lambda item: item[0])]


def _history_event(key: str, value: str, version: str) -> dict[str, Any] | None:
    if not key.startswith((TAG_ATTEMPT_PREFIX, TAG_ROLLBACK_PREFIX)):
        return None
    try:
        rec = json.loads(value)
    except ValueError:
        return None
    if key.startswith(TAG_ROLLBACK_PREFIX):
        return {"at": rec.get("at"), "actor": rec.get("actor"), "event": "rollback",
                "from": str(rec.get("from") or ""), "to": str(rec.get("to") or version),
                "reason": f"rolled back from version {rec.get('from')}"}
    if rec.get("outcome") not in ("promoted", "superseded"):
        return None
    reason = rec.get("reason") or ("forced (no gate decision)" if rec.get("decision") is None
                                   else "gate decision: promote")
    return {"at": rec.get("at"), "actor": rec.get("actor"),
            "event": "promote" if rec["outcome"] == "promoted" else "superseded",
            "from": str(rec.get("previous") or ""), "to": version, "reason": reason}


def format_history(events: list[dict[str, Any]]) -> str:
    """Plain-text table of :func:`history`: when, who, event, from -> to, reason."""
    if not events:
        return "(champion has never moved)"
    table = [["when", "who", "event", "from -> to", "reason"]]
    for e in events:
        table.append([(e.get("at") or "").replace("T", " "), e.get("actor") or "?",
                      e.get("event") or "", f"{e.get('from') or '-'} -> {e.get('to') or '-'}",
                      e.get("reason") or ""])
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 6)
    return "\n".join(line.rstrip() for line in lines)
