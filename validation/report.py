"""The gate's report objects (:class:`ValidationReport`, :class:`ExpectationOutcome`) and their
making from GX validation results, in plain JSON-able Python types (no GX import here)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_EXAMPLES = 5  # unexpected values kept per expectation (row index + value)
_MAX_VALUE_CHARS = 80  # long texts are cut in examples / summary

# kwargs that are plumbing, not part of what an expectation checks (kept out of the summary line)
_QUIET_KWARGS = {"column", "result_format", "catch_exceptions", "meta", "rendered_content"}


@dataclass
class ExpectationOutcome:
    """One expectation's result, in plain JSON-able Python types."""

    expectation_type: str
    column: str | None
    success: bool
    # observed_value, or {unexpected_count, unexpected_percent, element_count}
    observed: Any = None
    examples: list[dict[str, Any]] = field(default_factory=list)  # [{"row": idx, "value": v}]
    kwargs: dict[str, Any] = field(default_factory=dict)
    unexpected_count: int | None = None
    unexpected_percent: float | None = None
    element_count: int | None = None
    why: str | None = None  # the suite entry's meta.why
    error: str | None = None  # GX raised while evaluating (e.g. column missing from the data)

    def describe(self) -> str:
        """One line (plus an indented 'why') for this outcome."""
        args = ", ".join(f"{k}={_short(v)}" for k, v in self.kwargs.items()
                         if k not in _QUIET_KWARGS)
        where = f"column {self.column!r}" if self.column else "table"
        head = f"{self.expectation_type} ({where}{', ' + args if args else ''})"
        if self.error:
            body = f"error: {self.error}"
        elif self.unexpected_count is not None:
            pct = f"{self.unexpected_percent:.2f}%" if self.unexpected_percent is not None else "?"
            body = (f"observed {self.unexpected_count} unexpected of {self.element_count} rows "
                    f"({pct})")
        else:
            body = f"observed {_short(self.observed)}"
        if self.examples:
            body += "; examples: " + ", ".join(
                f"row {e['row']}: {_short(e['value'])}" for e in self.examples)
        hint = self._type_hint()
        return (f"{head}: {body}" + (f" ({hint})" if hint else "")
                + (f"\n      why: {self.why}" if self.why else ""))

    def _type_hint(self) -> str | None:
        """'1' vs 1: say so when the unexpected values are the value_set's members as text."""
        allowed = self.kwargs.get("value_set")
        if self.success or not isinstance(allowed, list) or not self.examples:
            return None
        as_text = {str(a) for a in allowed}
        vals = [e["value"] for e in self.examples]
        if all(type(v) is str and v.strip() in as_text for v in vals) and not any(
                type(a) is str for a in allowed):
            return "hint: the values are strings but value_set holds numbers"
        return None

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({
            "expectation_type": self.expectation_type, "column": self.column,
            "success": self.success, "observed": self.observed, "examples": self.examples,
            "kwargs": self.kwargs, "unexpected_count": self.unexpected_count,
            "unexpected_percent": self.unexpected_percent, "element_count": self.element_count,
            "why": self.why, "error": self.error,
        })


@dataclass
class ValidationReport:
    suite_name: str
    suite_version: str
    success: bool
    outcomes: list[ExpectationOutcome]
    statistics: dict[str, Any] = field(default_factory=dict)
    docs_dir: Path | None = None
    suite_path: Path | None = None

    @property
    def failed(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    def summary(self) -> str:
        n, bad = len(self.outcomes), len(self.failed)
        rows = self.statistics.get("rows")
        head = (f"validation {'PASSED' if self.success else 'FAILED'}: suite {self.suite_name!r} "
                f"v{self.suite_version}: "
                + (f"all {n} expectations met" if not bad else f"{bad} of {n} expectations failed")
                + (f" ({rows} rows)" if rows is not None else ""))
        lines = [head]
        for o in self.failed:
            lines.append(f"  FAILED {o.describe()}")
        if self.docs_dir:
            lines.append(f"  data docs: {Path(self.docs_dir) / 'index.html'}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable({
            "suite": self.suite_name, "version": self.suite_version, "success": self.success,
            "statistics": self.statistics,
            "failed": [o.expectation_type for o in self.failed],
            "outcomes": [o.to_dict() for o in self.outcomes],
        })


def report_from_result(result: Any, gx_suite: Any, spec: dict[str, Any], *, version: str,
                       suite_path: Path, docs: Path | None, rows: int) -> ValidationReport:
    """The :class:`ValidationReport` of one checkpoint run of ``gx_suite`` (the suite ``spec``
    read from ``suite_path``) on ``rows`` rows; ``docs``: where the data docs were asked for."""
    (suite_result,) = result.run_results.values()
    # GX evaluates (and reports) grouped by domain; put the outcomes back in the suite's order
    order = {e.id: i for i, e in enumerate(gx_suite.expectations)}
    ranked = sorted(suite_result.results,
                    key=lambda r: order.get(r.expectation_config.id, len(order)))
    outcomes = [_outcome(r) for r in ranked]
    stats = _jsonable(dict(suite_result.statistics))
    stats["rows"] = rows
    return ValidationReport(
        suite_name=spec["name"], suite_version=version,
        success=bool(suite_result.success) and all(o.success for o in outcomes),
        outcomes=outcomes, statistics=stats,
        docs_dir=docs if docs is not None and (docs / "index.html").is_file() else None,
        suite_path=suite_path,
    )


def _outcome(res: Any) -> ExpectationOutcome:
    cfg = res.expectation_config
    kwargs = {k: v for k, v in dict(cfg.kwargs).items() if k not in ("batch_id",)}
    r = dict(res.result or {})
    error = _error_message(res.exception_info)
    examples = []
    values = r.get("partial_unexpected_list") or []
    rows = r.get("partial_unexpected_index_list") or []
    for i, v in enumerate(values[:MAX_EXAMPLES]):
        examples.append({"row": rows[i] if i < len(rows) else None, "value": _clip(v)})
    if "observed_value" in r:
        observed = r["observed_value"]
    elif "unexpected_count" in r:
        observed = {k: r.get(k) for k in ("unexpected_count", "unexpected_percent",
                                          "element_count")}
    else:
        observed = None
    meta = dict(cfg.meta or {})
    return ExpectationOutcome(
        expectation_type=cfg.type,
        column=kwargs.get("column"),
        success=bool(res.success) and error is None,
        observed=_jsonable(observed),
        examples=_jsonable(examples),
        kwargs=_jsonable(kwargs),
        unexpected_count=_int_or_none(r.get("unexpected_count")),
        unexpected_percent=_float_or_none(r.get("unexpected_percent")),
        element_count=_int_or_none(r.get("element_count")),
        why=meta.get("why"),
        error=error,
    )


def _error_message(info: Any) -> str | None:
    """GX 1.x exception_info is either {raised_exception, exception_message, ...} or a dict of
    those keyed by metric."""
    if not info:
        return None
    items = [info] if "raised_exception" in info else list(info.values())
    for item in items:
        if isinstance(item, dict) and item.get("raised_exception"):
            msg = str(item.get("exception_message") or "GX raised an exception").strip()
            return msg.splitlines()[0] if msg else "GX raised an exception"
    return None


def _jsonable(obj: Any) -> Any:
    """numpy/pandas scalars -> Python; NaN/NaT/inf -> None; sets/tuples -> lists."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        try:
            return _jsonable(obj.item())
        except (ValueError, TypeError):
            pass
    if hasattr(obj, "to_json_dict"):
        return _jsonable(obj.to_json_dict())
    try:
        import pandas as pd

        if obj is pd.NA or obj is pd.NaT:
            return None
        if isinstance(obj, pd.Timestamp):
            return obj.isoformat()
    except ImportError:  # pragma: no cover
        pass
    return str(obj)


def _clip(v: Any) -> Any:
    if isinstance(v, str) and len(v) > _MAX_VALUE_CHARS:
        return v[:_MAX_VALUE_CHARS] + f"... ({len(v)} chars)"
    return v


def _short(v: Any) -> str:
    s = repr(_jsonable(v))
    return s if len(s) <= _MAX_VALUE_CHARS + 20 else s[:_MAX_VALUE_CHARS] + "...'"


def _int_or_none(v: Any) -> int | None:
    v = _jsonable(v)
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _float_or_none(v: Any) -> float | None:
    v = _jsonable(v)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
