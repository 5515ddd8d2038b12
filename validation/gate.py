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

The report objects and their making from GX results live in ``validation/report.py``.
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
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# the report objects are re-exported: the package and callers import them from here
from validation.report import ExpectationOutcome, ValidationReport, report_from_result

__all__ = ["SUITES_DIR", "ExpectationOutcome", "SuiteError", "UnknownSuiteError",
           "ValidationReport", "available_suites", "load_suite_spec", "resolve_suite",
           "validate"]

SUITES_DIR = Path(__file__).resolve().parent / "suites"


class SuiteError(ValueError):
    """The suite JSON is malformed: unreadable, wrong shape, or an expectation GX rejects."""


class UnknownSuiteError(FileNotFoundError, ValueError):
    """No suite by that name or path (a ValueError and a FileNotFoundError: catch either)."""


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
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise SuiteError(f"{label}: unknown expectation type {etype!r} in GX "
                             f"{gx.__version__}{did_you_mean}")
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
        context, checkpoint, gx_suite = _checkpoint(gx, spec, path, docs, examples)
        result = checkpoint.run(batch_parameters={"dataframe": df})
        if examples != "full":
            _scrub_results(context, result, examples, build_docs=docs is not None)
    return report_from_result(result, gx_suite, spec, version=version, suite_path=path,
                              docs=docs, rows=len(df))


def _checkpoint(gx: Any, spec: dict[str, Any], path: Path, docs: Path | None,
                examples: str) -> tuple[Any, Any, Any]:
    """(context, checkpoint, suite): one ephemeral context holding the suite, a whole-dataframe
    batch definition, its validation definition and the SUMMARY checkpoint; with ``docs``, a
    local data-docs site there (written by the checkpoint only when ``examples`` is full)."""
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
        if examples == "full":  # else built by _scrub_results, from the scrubbed results
            actions.append(gx.checkpoint.UpdateDataDocsAction(name="data_docs",
                                                              site_names=["maas"]))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name=f"{spec['name']}-checkpoint", validation_definitions=[vdef], actions=actions,
        result_format={"result_format": "SUMMARY", "partial_unexpected_count": 20}))
    return context, checkpoint, gx_suite


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
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)
