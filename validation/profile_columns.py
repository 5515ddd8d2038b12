"""Draft expectations for a profile's plain columns (any family's per-row profile).

``maas suite init`` drafts from the family's per-row profile: ``text`` (text lengths, duplicates)
and ``label`` have their own drafters in :mod:`validation.profile`; every other column gets one
here by its kind, each with its ``why``: numbers a range (the profiled min/max widened by a
margin of the observed range), booleans and categorical strings (at most
:data:`MAX_CATEGORIES` distinct values) their observed set, and every column "not null" (with
the profiled null share as ``mostly`` when the sample already had nulls).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

#: a string column with at most this many distinct values is treated as categorical
MAX_CATEGORIES = 20


def column_entries(df: pd.DataFrame, column: str, margin: float) -> list[dict[str, Any]]:
    """The drafted expectations of ``df[column]`` (neither ``text`` nor ``label``)."""
    from validation.profile import _entry, _floor

    s = df[column]
    nulls = int(s.isna().sum())
    kwargs: dict[str, Any] = {"column": column}
    why = f"every row has {column!r}"
    if nulls:
        kwargs["mostly"] = _floor(1 - nulls / len(df))
        why += f"; the profiled sample already had {nulls} null(s), so mostly={kwargs['mostly']}"
    out = [_entry("expect_column_values_to_not_be_null", kwargs, why, nulls=nulls, rows=len(df))]
    present = s.dropna()
    if present.empty:
        return out
    if pd.api.types.is_bool_dtype(present) or (
            present.map(type).eq(str).all() and present.nunique() <= MAX_CATEGORIES):
        values = sorted({v.item() if hasattr(v, "item") else v for v in present.unique()},
                        key=lambda v: (type(v).__name__, v))
        out.append(_entry("expect_column_values_to_be_in_set",
                          {"column": column, "value_set": values},
                          f"the {len(values)} values of {column!r} seen in the profiled sample; "
                          "another is a new kind of input that needs a new suite version",
                          distinct=len(values)))
    elif pd.api.types.is_numeric_dtype(present):
        out.append(_range(column, present.astype(float), margin,
                          pd.api.types.is_integer_dtype(present)))
    return out


def _range(column: str, values: pd.Series, margin: float, integers: bool) -> dict[str, Any]:
    from validation.profile import _entry

    lo, hi = float(values.min()), float(values.max())
    pad = (hi - lo) * margin or abs(hi) * margin
    low, high = lo - pad, hi + pad
    if integers:
        low, high = math.floor(low), math.ceil(high)
    else:
        low, high = math.floor(low * 1e4) / 1e4, math.ceil(high * 1e4) / 1e4
    return _entry("expect_column_values_to_be_between",
                  {"column": column, "min_value": low, "max_value": high},
                  f"{column!r} within the profiled range {lo:g}..{hi:g} widened by {margin:.0%} "
                  "of it: outside is a different kind of input (or a broken one)",
                  min=lo, max=hi, margin=margin)
