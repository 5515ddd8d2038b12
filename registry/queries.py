"""Read-only registry queries: the current champion, one row per version (``describe``) and
its plain-text table for ``maas models NAME``. Tag layout: :mod:`registry.tags`."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from registry.tags import (
    CHALLENGER,
    CHAMPION,
    TAG_DECISION_PREFIX,
    TAG_METRIC_PREFIX,
    TAG_PREVIOUS_CHAMPION,
    TAG_PROMOTED_AT,
    TAG_PROMOTED_BY,
    TAG_ROLLED_BACK_AT,
    TAG_RUN_ID,
    TAG_VARIANT,
    iso,
)
from registry.versions import NOT_FOUND, get_model, search_versions


def champion(name: str) -> ModelVersion | None:
    """The version behind ``models:/NAME@champion``; None if the model or the alias is missing."""
    client = mlflow.MlflowClient()
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        # Missing model: RESOURCE_DOES_NOT_EXIST; missing alias: INVALID_PARAMETER_VALUE.
        if exc.error_code in NOT_FOUND:
            return None
        raise


def describe(name: str) -> list[dict[str, Any]]:
    """One row per version of ``name``, newest first.

    Keys: ``version`` (str), ``aliases`` (list), ``status``, ``run_id`` (``maas.run_id`` or the
    version's run id), ``created_at`` (ISO UTC), ``source``, ``description``, ``metrics`` (from the
    ``maas.metric.<name>`` tags, floats), ``decision`` ("promote"/"reject"/None),
    ``decision_reason``, ``promoted_at``, ``promoted_by``, ``previous_champion``,
    ``rolled_back_at``, ``variant`` (the compression variant served, ``maas.variant``; "fp32"
    for versions registered without variants).
    """
    client = mlflow.MlflowClient()
    model = get_model(client, name)
    aliases: dict[str, list[str]] = {}
    for alias, v in (model.aliases or {}).items():  # search results carry no aliases
        aliases.setdefault(str(v), []).append(alias)
    rows = []
    for mv in sorted(search_versions(client, name), key=lambda v: -int(v.version)):
        tags = mv.tags or {}
        metrics: dict[str, Any] = {}
        for k, v in tags.items():
            if k.startswith(TAG_METRIC_PREFIX):
                try:
                    metrics[k[len(TAG_METRIC_PREFIX):]] = float(v)
                except ValueError:
                    metrics[k[len(TAG_METRIC_PREFIX):]] = v
        promote_tag = tags.get(TAG_DECISION_PREFIX + "promote")
        rows.append({
            "version": str(mv.version),
            "aliases": sorted(aliases.get(str(mv.version), []),
                              key=lambda a: (a != CHAMPION, a != CHALLENGER, a)),
            "status": mv.status,
            "run_id": tags.get(TAG_RUN_ID) or mv.run_id,
            "created_at": iso(datetime.fromtimestamp(mv.creation_timestamp / 1000,
                                                     timezone.utc)),
            "source": mv.source,
            "description": mv.description or "",
            "metrics": dict(sorted(metrics.items())),
            "decision": None if promote_tag is None else
            ("promote" if promote_tag == "true" else "reject"),
            "decision_reason": tags.get(TAG_DECISION_PREFIX + "reason"),
            "promoted_at": tags.get(TAG_PROMOTED_AT),
            "promoted_by": tags.get(TAG_PROMOTED_BY),
            "previous_champion": tags.get(TAG_PREVIOUS_CHAMPION),
            "rolled_back_at": tags.get(TAG_ROLLED_BACK_AT),
            "variant": tags.get(TAG_VARIANT) or "fp32",
        })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of ``describe`` rows, one column per metric."""
    if not rows:
        return "(no versions)"
    metric_names = sorted({m for r in rows for m in r.get("metrics", {})})
    header = ["version", "aliases", "created", "run", *metric_names, "variant", "decision",
              "reason"]
    table = [header]
    for r in rows:
        reason = r.get("decision_reason") or ""
        if len(reason) > 60:
            reason = reason[:57] + "..."
        metrics = r.get("metrics", {})
        table.append([
            str(r["version"]),
            ",".join(r.get("aliases", [])) or "-",
            (r.get("created_at") or "")[:19].replace("T", " "),
            (r.get("run_id") or "")[:8],
            *[_fmt_metric(metrics.get(m)) for m in metric_names],
            r.get("variant") or "fp32",
            r.get("decision") or "-",
            reason,
        ])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt_metric(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)
