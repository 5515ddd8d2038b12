"""Draft an expectation suite from a trusted sample: ``draft_suite(df, name) -> dict`` (pure).

GX Core 1.x has no data profiler, so this module profiles the normalised ``text``/``label`` frame
itself (pandas only, no GX import) and writes the bounds as GX 1.x core expectations in the suite
JSON format :func:`validation.gate.load_suite_spec` reads. Every entry carries ``meta.why`` (what
it guards and how the bound was derived) and ``meta.observed`` (the statistics it came from):

* row count: at least ``min(rows, max(100, 10% of rows))``
* nulls: ``text`` and ``label`` not null (``mostly`` = the observed non-null share if the sample
  already has nulls)
* label set: ``expect_column_values_to_be_in_set`` (unknown labels) and
  ``expect_column_distinct_values_to_contain_set`` (a vanished class); the label values keep
  their type (str or int) as the gate sees them
* per-class share bounds, from the observed share ``s`` with a relative tolerance ``t``:
  at least ``s * (1 - t)`` of the labelled rows are the class
  (``expect_column_values_to_be_in_set([c], mostly=...)``) and at most ``s * (1 + t)``
  (``expect_column_values_to_not_be_in_set([c], mostly=...)``, omitted when >= 100%)
* text length: hard bounds ``[1, max * (1 + m)]`` for every row (1 rejects "", which GX pandas
  does not count as null) and bulk bounds ``[q01 * (1 - m), q99 * (1 + m)]`` for 95% of rows
* duplicate rate: distinct texts / texts >= ``1 - (d + max(d, margin))`` (``d`` observed)
* optional PII checks from :mod:`validation.pii` (``pii=True``)

Bounds are rounded outwards, so the sample the suite was drafted from always passes it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pandas is only needed by the caller's frame: importing stays cheap
    import pandas as pd

DEFAULT_SHARE_TOLERANCE = 0.5  # a class share may move by +-50% of its observed value
DEFAULT_LENGTH_MARGIN = 0.5  # length bounds widened by 50% beyond the observed quantiles
DEFAULT_DUPLICATE_MARGIN = 0.05  # extra duplicate rate allowed beyond the observed one
BULK_QUANTILES = (0.01, 0.99)
BULK_MOSTLY = 0.95
MIN_ROWS_FLOOR = 100


class ProfileError(ValueError):
    """The sample cannot be profiled into a usable suite; the message names the column."""


def draft_suite(df: pd.DataFrame, name: str, *,
                share_tolerance: float = DEFAULT_SHARE_TOLERANCE,
                length_margin: float = DEFAULT_LENGTH_MARGIN,
                duplicate_margin: float = DEFAULT_DUPLICATE_MARGIN,
                fingerprint: str | None = None, drafted_on: dt.date | None = None,
                source: str | None = None, pii: bool = False) -> dict[str, Any]:
    """A suite dict (``name``, ``meta``, ``expectations``) drafted from ``df``: a family's per-row
    profile, ``label`` and either ``text`` or other plain columns (drafted by kind:
    :mod:`validation.profile_columns`). ``fingerprint`` is the data's sha256 (default: of the
    frame's values), ``drafted_on`` the draft date (default: today, UTC); ``pii`` appends
    :func:`validation.pii.pii_expectations` for ``text``. Raises :class:`ProfileError` for a
    sample without rows, text, or at least two classes."""
    _check_frame(df, name, share_tolerance, length_margin, duplicate_margin)
    fp = fingerprint or frame_fingerprint(df)
    day = drafted_on or dt.datetime.now(dt.timezone.utc).date()
    from validation.profile_columns import column_entries

    n = len(df)
    expectations = [
        _row_count(n),
        *_nulls(df),
        *_label_set(df.label),
        *_class_shares(df.label, share_tolerance),
    ]
    if "text" in df.columns:
        expectations += [*_text_lengths(df.text, length_margin),
                         _duplicates(df.text, duplicate_margin)]
    for col in df.columns:
        if col not in ("text", "label"):
            expectations += column_entries(df, str(col), length_margin)
    if pii:
        expectations += _pii_entries()
    return {
        "name": name,
        "meta": {
            "version": f"1.0.0-draft.{day:%Y%m%d}.{fp[:12]}",
            "description": (f"Drafted by `maas suite init` from {n} rows"
                            + (f" of {source}" if source else "")
                            + "; review the bounds, set `version` to 1.0.0, and bump it on "
                            "every change."),
            "drafted_on": day.isoformat(),
            "data_sha256": fp,
            "rows_profiled": n,
            "draft_settings": {"share_tolerance": share_tolerance,
                               "length_margin": length_margin,
                               "duplicate_margin": duplicate_margin, "pii": pii},
        },
        "expectations": expectations,
    }


def frame_fingerprint(df: pd.DataFrame) -> str:
    """sha256 of the frame's values in order (its columns, ``label`` last), types included
    (1 != "1"); for a (text, label) frame the hash it always had."""
    h = hashlib.sha256()
    cols = [c for c in df.columns if c != "label"] + ["label"]
    for row in zip(*(df[c].tolist() for c in cols), strict=True):
        h.update(("\t".join(repr(_py(v)) for v in row) + "\n").encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# one drafter per guarded property


def _row_count(n: int) -> dict[str, Any]:
    floor = min(n, max(MIN_ROWS_FLOOR, math.ceil(0.1 * n)))
    return _entry("expect_table_row_count_to_be_between", {"min_value": floor},
                  f"at least {floor} rows: min(profiled rows, max({MIN_ROWS_FLOOR}, 10% of the "
                  f"{n} profiled rows)); fewer is too little to split, tune and test on",
                  rows=n)


def _nulls(df: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    for col, what in (("text", "text"), ("label", "a label")):
        if col not in df.columns:
            continue
        nulls = int(df[col].isna().sum())
        kwargs: dict[str, Any] = {"column": col}
        why = f"every example needs {what}"
        if nulls:
            kwargs["mostly"] = _floor(1 - nulls / len(df))
            why += (f"; the profiled sample already had {nulls} null(s), so mostly="
                    f"{kwargs['mostly']} (set 1.0 once the source is clean)")
        out.append(_entry("expect_column_values_to_not_be_null", kwargs, why, nulls=nulls,
                          rows=len(df)))
    return out


def _label_set(labels: pd.Series) -> list[dict[str, Any]]:
    values = _classes(labels)
    kind = "strings" if all(isinstance(v, str) for v in values) else "integers"
    return [
        _entry("expect_column_values_to_be_in_set", {"column": "label", "value_set": values},
               f"the {len(values)} classes seen in the profiled sample ({kind}, as the gate sees "
               "them); any other label is a typo, a shifted column or a new class that needs a "
               "new suite version", classes=len(values)),
        _entry("expect_column_distinct_values_to_contain_set",
               {"column": "label", "value_set": values},
               "every profiled class is still present: a vanished class cannot be learned or "
               "tested", classes=len(values)),
    ]


def _class_shares(labels: pd.Series, tol: float) -> list[dict[str, Any]]:
    counts = labels.dropna().map(_py).value_counts()
    total = int(counts.sum())
    out = []
    for c in _classes(labels):
        share = int(counts[c]) / total
        low, high = _floor(share * (1 - tol)), _ceil(share * (1 + tol))
        stats = {"share": round(share, 6), "rows": int(counts[c]), "labelled_rows": total,
                 "tolerance": tol}
        band = f"observed {share:.1%} of {total} labelled rows, tolerance +-{tol:.0%} of it"
        if low > 0:
            out.append(_entry("expect_column_values_to_be_in_set",
                              {"column": "label", "value_set": [c], "mostly": low},
                              f"class share: label {c!r} holds at least {low:.2%} of the "
                              f"labelled rows ({band}); a collapsing class fails", **stats))
        if high < 1:
            out.append(_entry("expect_column_values_to_not_be_in_set",
                              {"column": "label", "value_set": [c], "mostly": _floor(1 - high)},
                              f"class share: label {c!r} holds at most {high:.2%} of the "
                              f"labelled rows ({band}); a dominating class fails", **stats))
    return out


def _text_lengths(texts: pd.Series, margin: float) -> list[dict[str, Any]]:
    lengths = texts.dropna().map(lambda t: len(str(t)))
    q_lo, q_hi = (float(lengths.quantile(q)) for q in BULK_QUANTILES)
    longest, shortest = int(lengths.max()), int(lengths.min())
    hard_max = max(1, math.ceil(longest * (1 + margin)))
    bulk_min = max(1, math.floor(q_lo * (1 - margin)))
    bulk_max = max(bulk_min, math.ceil(q_hi * (1 + margin)))
    inside = float(lengths.between(bulk_min, bulk_max).mean())
    stats = {"min": shortest, "max": longest, "q01": round(q_lo, 3),
             "q50": round(float(lengths.median()), 3), "q99": round(q_hi, 3), "margin": margin}
    return [
        _entry("expect_column_value_lengths_to_be_between",
               {"column": "text", "min_value": 1, "max_value": hard_max},
               f"empty strings are not null to GX pandas, so min_value 1 is what rejects \"\"; "
               f"max_value = longest profiled text ({longest} chars) + {margin:.0%}: longer is "
               "almost always a scraping/joining error", **stats),
        _entry("expect_column_value_lengths_to_be_between",
               {"column": "text", "min_value": bulk_min, "max_value": bulk_max,
                "mostly": min(BULK_MOSTLY, _floor(inside))},
               f"bulk of the length distribution: {BULK_MOSTLY:.0%} of texts within the "
               f"profiled 1%-99% quantiles ({q_lo:.1f}-{q_hi:.1f} chars) widened by "
               f"{margin:.0%}; fails when texts are truncated or concatenated wholesale",
               inside_share=round(inside, 6), **stats),
    ]


def _duplicates(texts: pd.Series, margin: float) -> dict[str, Any]:
    present = texts.dropna()
    unique = present.nunique() / len(present)
    dup = 1 - unique
    low = max(0.0, _floor(1 - (dup + max(dup, margin))))
    return _entry("expect_column_proportion_of_unique_values_to_be_between",
                  {"column": "text", "min_value": low},
                  f"duplicate-rate bound: distinct texts / non-null texts >= {low} (profiled: "
                  f"{unique:.4f}, i.e. {dup:.2%} duplicates; allowed: that plus max(itself, "
                  f"{margin:.0%})); duplicates leak between train and test",
                  unique_proportion=round(unique, 6), texts=len(present))


def _pii_entries() -> list[dict[str, Any]]:
    try:
        from validation.pii import pii_expectations
    except ImportError as exc:
        raise ImportError(f"PII checks need validation.pii.pii_expectations, which is not "
                          f"available in this installation ({exc}); draft without --pii") from None
    return list(pii_expectations(column="text", mostly=1.0))


# --------------------------------------------------------------------------------------------
# helpers


def _check_frame(df: pd.DataFrame, name: str, *settings: float) -> None:
    missing = [c for c in ("label",) if c not in df.columns]
    if missing or len(df.columns) < 2:
        raise ProfileError(f"cannot draft suite {name!r}: missing column(s) {missing or ['text']};"
                           f" the frame needs 'label' and the family's profile columns ('text', "
                           f"...); it has {[str(c) for c in df.columns]}")
    if not name.strip():
        raise ProfileError("a suite needs a non-empty name")
    if not all(0 <= s < 1 for s in settings):
        raise ProfileError(f"tolerances and margins must be in [0, 1): {settings}")
    if "text" in df.columns and df.text.dropna().empty:
        raise ProfileError(f"cannot draft suite {name!r}: column 'text' has no non-null values "
                           f"in {len(df)} rows")
    classes = _classes(df.label)
    if len(classes) < 2:
        raise ProfileError(f"cannot draft suite {name!r}: column 'label' has {len(classes)} "
                           f"class(es) {classes} in {len(df)} rows; a trusted sample for a "
                           "classifier needs at least two")


def _classes(labels: pd.Series) -> list[Any]:
    """Distinct non-null labels as plain Python values, sorted (ints before strs)."""
    values = {_py(v) for v in labels.dropna().unique().tolist()}
    return sorted(values, key=lambda v: (type(v).__name__, v))


def _py(v: Any) -> Any:
    return v.item() if hasattr(v, "item") and callable(v.item) else v


def _entry(etype: str, kwargs: dict[str, Any], why: str, **observed: Any) -> dict[str, Any]:
    return {"type": etype, "kwargs": kwargs, "meta": {"why": why, "observed": observed}}


def _floor(x: float) -> float:
    """Round down to 4 decimals (a lower bound stays below the observed value)."""
    return math.floor(round(x * 1e4, 6)) / 1e4


def _ceil(x: float) -> float:
    """Round up to 4 decimals (an upper bound stays above the observed value)."""
    return math.ceil(round(x * 1e4, 6)) / 1e4
