"""The validation gate: run a versioned GX Core 1.x expectation suite against a DataFrame.

Flow (all GX's own objects, one ephemeral context per call)::

    suite JSON -> ExpectationConfiguration(s) -> gx.ExpectationSuite
    pandas data source -> dataframe asset -> whole-dataframe batch definition
    gx.ValidationDefinition(batch definition, suite)
    gx.Checkpoint([validation definition], actions=[UpdateDataDocsAction], result_format=SUMMARY)

SUMMARY (not COMPLETE) keeps the result small on big data while still carrying the counts and the
first 20 unexpected values with their row indexes (``partial_unexpected_index_list``). When
``docs_dir`` is given, a local data-docs site is registered on the context with
``base_directory=docs_dir`` and the checkpoint's ``UpdateDataDocsAction`` writes ``index.html``
(plus the suite and validation pages) there, ready for ``mlflow.log_artifacts``.

Great Expectations is imported lazily (inside :func:`validate`) with analytics off, progress bars
off and its loggers held at ERROR for the duration of the call.

Privacy (``validate(..., examples="redacted" | "none")``): the checkpoint runs without the docs
action; every data value in its results (unexpected values, observed values, details) is masked
or withheld (:func:`validation.pii.scrub`), the scrubbed results are stored back in the context's
validation-results store and the data docs are built from them, so neither the report nor the
HTML holds raw data text. Counts and row indexes stay.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUITES_DIR = Path(__file__).resolve().parent / "suites"
MAX_EXAMPLES = 5  # unexpected values kept per expectation (row index + value)
_MAX_VALUE_CHARS = 80  # long texts are cut in examples / summary

# kwargs that are plumbing, not part of what an expectation checks (kept out of the summary line)
_QUIET_KWARGS = {"column", "result_format", "catch_exceptions", "meta", "rendered_content"}


class SuiteError(ValueError):
    """The suite JSON is malformed: unreadable, wrong shape, or an expectation GX rejects."""


class UnknownSuiteError(FileNotFoundError, ValueError):
    """No suite by that name or path (a ValueError and a FileNotFoundError: catch either)."""


# --------------------------------------------------------------------------------------------
# report objects


@dataclass
class ExpectationOutcome:
    """One expectation's result, in plain JSON-able Python types."""

    expectation_type: str
    column: str | None
    success: bool
    observed: Any = None  # observed_value, or {unexpected_count, unexpected_percent, element_count}
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


# --------------------------------------------------------------------------------------------
# suites


def available_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.json"))


def resolve_suite(name_or_path: str | os.PathLike[str]) -> Path:
    """A suite name in ``validation/suites/`` (``"sentiment"``) or a path to a suite JSON."""
    raw = str(name_or_path).strip()
    if not raw:
        raise UnknownSuiteError(f"empty suite name; available suites: {available_suites()}")
    as_path = Path(raw).expanduser()
    if as_path.is_file():
        return as_path.resolve()
    looks_like_path = (isinstance(name_or_path, os.PathLike) or os.sep in raw or "/" in raw
                       or raw.endswith(".json"))
    if not looks_like_path:
        candidate = SUITES_DIR / f"{raw}.json"
        if candidate.is_file():
            return candidate
    names = available_suites()
    hint = difflib.get_close_matches(Path(raw).stem, names, n=1)
    raise UnknownSuiteError(
        f"unknown expectation suite {raw!r}"
        + (" (no such file)" if looks_like_path else "")
        + f"; available suites in {SUITES_DIR}: {names}"
        + (f" (did you mean {hint[0]!r}?)" if hint else "")
        + "; or pass a path to a suite JSON file")


def load_suite_spec(path: Path) -> dict[str, Any]:
    """Read and shape-check a suite JSON (GX-level checks happen in :func:`_build_suite`)."""
    try:
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SuiteError(f"suite {path}: not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise SuiteError(f"suite {path}: expected a JSON object with 'name' and 'expectations'")
    if not isinstance(spec.get("name"), str) or not spec["name"].strip():
        raise SuiteError(f"suite {path}: missing string field 'name'")
    exps = spec.get("expectations")
    if not isinstance(exps, list) or not exps:
        raise SuiteError(f"suite {path}: 'expectations' must be a non-empty list")
    if not isinstance(spec.get("meta", {}), dict):
        raise SuiteError(f"suite {path}: 'meta' must be an object")
    for i, e in enumerate(exps):
        label = f"suite {path}: expectation #{i}"
        if not isinstance(e, dict):
            raise SuiteError(f"{label}: expected an object with 'type' and 'kwargs'")
        etype = e.get("type", e.get("expectation_type"))
        if not isinstance(etype, str) or not etype:
            raise SuiteError(f"{label}: missing 'type'")
        if not isinstance(e.get("kwargs", {}), dict):
            raise SuiteError(f"{label} ({etype}): 'kwargs' must be an object")
        if not isinstance(e.get("meta", {}) or {}, dict):
            raise SuiteError(f"{label} ({etype}): 'meta' must be an object")
    return spec


def _build_suite(gx: Any, spec: dict[str, Any], path: Path) -> Any:
    """gx.ExpectationSuite from the JSON; every entry checked by GX's own expectation models."""
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )
    from great_expectations.expectations.registry import (
        list_registered_expectation_implementations,
    )

    expectations: list[Any] = []
    seen: dict[str, int] = {}
    known = list_registered_expectation_implementations()
    for i, e in enumerate(spec["expectations"]):
        etype = e.get("type", e.get("expectation_type"))
        label = f"suite {path}: expectation #{i} ({etype})"
        if etype not in known:
            hint = difflib.get_close_matches(etype, known, n=1)
            raise SuiteError(f"{label}: unknown expectation type {etype!r} in GX "
                             f"{gx.__version__}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        kwargs = dict(e.get("kwargs") or {})
        config = ExpectationConfiguration(type=etype, kwargs=kwargs,
                                          meta=dict(e.get("meta") or {}))
        try:
            expectations.append(config.to_domain_obj())  # GX's pydantic model checks the kwargs
        except Exception as exc:  # noqa: BLE001 # pydantic ValidationError or GX config error
            detail = " ".join(str(exc).split())
            raise SuiteError(f"{label}: invalid kwargs {kwargs}: {detail}") from None
        key = json.dumps([etype, kwargs], sort_keys=True, default=str)
        if key in seen:
            raise SuiteError(f"{label}: duplicate of expectation #{seen[key]} (same type and "
                             "kwargs)")
        seen[key] = i
    # Built in one go: ExpectationSuite(expectations=[...]) keeps every entry, whereas
    # suite.add_expectation_configuration upserts by *domain* (type + column) and would silently
    # drop the second of two same-type checks on one column (one class-balance check per label).
    return gx.ExpectationSuite(name=spec["name"], expectations=expectations,
                               meta=dict(spec.get("meta") or {}))


# --------------------------------------------------------------------------------------------
# validate


def validate(df: Any, suite: str | os.PathLike[str] = "sentiment",
             docs_dir: str | os.PathLike[str] | None = None, *,
             examples: str = "full") -> ValidationReport:
    """Validate ``df`` (columns ``text``, ``label``) against ``suite``; build data docs in
    ``docs_dir`` when given. Never raises for bad *data* (that is a failed report); raises
    :class:`UnknownSuiteError` / :class:`SuiteError` for a bad *suite*.

    ``examples`` says how data values (unexpected values, observed values) may appear in the
    report and the data docs: ``"full"`` as they are, ``"redacted"`` with PII masked
    (:func:`validation.pii.redact_text`), ``"none"`` withheld (counts and row indexes stay)."""
    from validation.pii import check_mode

    check_mode(examples, "examples")
    path = resolve_suite(suite)
    spec = load_suite_spec(path)
    version = str((spec.get("meta") or {}).get("version", "unversioned"))
    docs = Path(docs_dir).expanduser().resolve() if docs_dir is not None else None

    with _quiet_gx():
        gx = _import_gx()
        from great_expectations.data_context.types.base import ProgressBarsConfig

        gx_suite = _build_suite(gx, spec, path)
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False,
                                                             metric_calculations=False)
        gx_suite = context.suites.add(gx_suite)
        batch_def = (context.data_sources.add_pandas("maas")
                     .add_dataframe_asset("dataframe")
                     .add_batch_definition_whole_dataframe("whole_dataframe"))
        vdef = context.validation_definitions.add(gx.ValidationDefinition(
            name=f"{spec['name']}-gate", data=batch_def, suite=gx_suite))
        actions = []
        if docs is not None:
            docs.mkdir(parents=True, exist_ok=True)
            context.add_data_docs_site(site_name="maas", site_config={
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                                  "base_directory": str(docs)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            })
            if examples == "full":  # else built below, from the scrubbed results
                actions.append(gx.checkpoint.UpdateDataDocsAction(name="data_docs",
                                                                  site_names=["maas"]))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=f"{spec['name']}-checkpoint", validation_definitions=[vdef], actions=actions,
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": 20}))
        result = checkpoint.run(batch_parameters={"dataframe": df})
        if examples != "full":
            _scrub_results(context, result, examples, build_docs=docs is not None)

    (suite_result,) = result.run_results.values()
    # GX evaluates (and reports) grouped by domain; put the outcomes back in the suite's order
    order = {e.id: i for i, e in enumerate(gx_suite.expectations)}
    ranked = sorted(suite_result.results,
                    key=lambda r: order.get(r.expectation_config.id, len(order)))
    outcomes = [_outcome(r) for r in ranked]
    stats = _jsonable(dict(suite_result.statistics))
    stats["rows"] = len(df)
    return ValidationReport(
        suite_name=spec["name"], suite_version=version,
        success=bool(suite_result.success) and all(o.success for o in outcomes),
        outcomes=outcomes, statistics=stats,
        docs_dir=docs if docs is not None and (docs / "index.html").is_file() else None,
        suite_path=path,
    )


def _scrub_results(context: Any, result: Any, mode: str, build_docs: bool) -> None:
    """Privacy: replace every data value in the checkpoint's results (unexpected values and
    their counts, observed values, details) as ``mode`` allows, store the scrubbed results back
    in the context's validation-results store and only then build the data docs from them."""
    from validation.pii import scrub

    for key, suite_result in result.run_results.items():
        for res in suite_result.results:
            res.result = scrub(dict(res.result or {}), mode)
        context.validation_results_store.set(key, suite_result)
    if build_docs:
        context.build_data_docs(site_names=["maas"])


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


# --------------------------------------------------------------------------------------------
# helpers


def _import_gx() -> Any:
    os.environ["GX_ANALYTICS_ENABLED"] = "false"
    import great_expectations as gx

    return gx


@contextlib.contextmanager
def _quiet_gx() -> Iterator[None]:
    """GX's loggers at ERROR and its Python warnings muted for the duration of a call."""
    loggers = [logging.getLogger(n) for n in ("great_expectations", "py.warnings")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


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
