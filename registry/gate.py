"""The registry's pure gates (no MLflow calls): challenger vs champion, and which compression
variant of a model to serve. Both return frozen results that are recorded as evidence tags."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

TAG_DECISION_PREFIX = "maas.decision."
_FLOAT_TOL = 1e-12  # so that 0.85 - 0.80 counts as a delta of 0.05
#: the uncompressed model every variant is compared with
REFERENCE_VARIANT = "fp32"


@dataclass(frozen=True)
class Decision:
    """Outcome of the challenger-vs-champion gate. Higher is better for every metric."""

    promote: bool
    reason: str
    metric: str
    candidate: float
    incumbent: float | None
    delta: float | None
    min_delta: float
    thresholds: dict[str, float] = field(default_factory=dict)
    failed_thresholds: dict[str, float] = field(default_factory=dict)  # actual; nan = missing

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_tags(self) -> dict[str, str]:
        """String tags, keys prefixed ``maas.decision.``; None becomes ""; dicts become JSON."""
        p = TAG_DECISION_PREFIX
        return {
            p + "promote": "true" if self.promote else "false",
            p + "reason": self.reason,
            p + "metric": self.metric,
            p + "candidate": _num(self.candidate),
            p + "incumbent": _num(self.incumbent),
            p + "delta": _num(self.delta),
            p + "min_delta": _num(self.min_delta),
            p + "thresholds": json.dumps(self.thresholds, sort_keys=True),
            p + "failed_thresholds": json.dumps(self.failed_thresholds, sort_keys=True),
        }


def should_promote(
    candidate: dict[str, float],
    incumbent: dict[str, float] | None,
    metric: str,
    min_delta: float = 0.0,
    thresholds: dict[str, float] | None = None,
) -> Decision:
    """Decide whether ``candidate`` may replace ``incumbent`` (pure: no MLflow calls).

    Higher is better for ``metric`` and for every threshold metric. Promote iff

    * every absolute threshold holds: ``candidate[m] >= t`` (a missing or NaN metric fails), and
    * the candidate has ``metric``, and either there is no incumbent (``None``) or
      ``candidate[metric] - incumbent[metric] >= min_delta`` (1e-12 tolerance for float noise).

    An incumbent dict without ``metric`` cannot be compared and the candidate is rejected (promote
    it by hand if the metric changed on purpose). ``reason`` names every failing check.
    """
    thresholds = {str(k): float(v) for k, v in (thresholds or {}).items()}
    failures, failed = _threshold_failures(candidate, thresholds)
    cand = _as_float(candidate.get(metric))
    inc = None if incumbent is None else _as_float(incumbent.get(metric))
    delta: float | None = None
    if math.isnan(cand):
        failures.append(f"candidate has no {metric}")
        if inc is not None and math.isnan(inc):
            inc = None
        compared = f"{metric} unavailable"
    elif incumbent is None:
        compared = f"no incumbent champion; {metric}={cand:.4f}"
    elif math.isnan(inc):
        inc = None
        failures.append(f"incumbent champion has no {metric}; cannot compare")
        compared = ""
    else:
        delta = cand - inc
        if delta >= min_delta - _FLOAT_TOL:
            compared = (f"{metric} {cand:.4f} vs champion {inc:.4f}: delta {delta:+.4f} "
                        f">= min_delta {min_delta:g}")
        else:
            failures.append(f"{metric} {cand:.4f} vs champion {inc:.4f}: delta {delta:+.4f} "
                            f"< min_delta {min_delta:g}")
            compared = ""

    promote_ = not failures
    if promote_:
        reason = "promote: " + compared + ("; all thresholds met" if thresholds else "")
    else:
        reason = "reject: " + "; ".join(failures)
    return Decision(promote=promote_, reason=reason, metric=metric, candidate=cand,
                    incumbent=inc, delta=delta, min_delta=float(min_delta),
                    thresholds=thresholds, failed_thresholds=failed)


def _threshold_failures(candidate: dict[str, float], thresholds: dict[str, float]
                        ) -> tuple[list[str], dict[str, float]]:
    """The failed absolute thresholds: messages, and {metric: candidate value (NaN = missing)}."""
    failures: list[str] = []
    failed: dict[str, float] = {}
    for m, t in sorted(thresholds.items()):
        value = _as_float(candidate.get(m))
        if math.isnan(value):
            failed[m] = value
            failures.append(f"threshold {m} >= {t:g} failed: candidate has no {m}")
        elif value < t:
            failed[m] = value
            failures.append(f"threshold {m} >= {t:g} failed: {m}={value:.4f}")
    return failures, failed


def with_drift(decision: Decision, drift: str, *, breached: bool, block: bool) -> Decision:
    """The gate's decision with the drift check folded in (pure).

    ``drift`` is the check's one-line summary; ``breached`` whether a drift figure is over its
    threshold; ``block`` whether a breach stops promotion (``promotion.drift.mode: block``).
    Only a breach in block mode changes ``promote`` (to False); the summary is always appended
    to the reason, so the decision says what the drift figures were.
    """
    if breached and block:
        if decision.promote:
            reason = f"reject: drift blocks promotion ({drift}); metrics alone: {decision.reason}"
        else:
            reason = f"{decision.reason}; drift blocks promotion too ({drift})"
        return dataclasses.replace(decision, promote=False, reason=reason)
    label = "drift warning (mode warn, not blocking)" if breached else "drift"
    return dataclasses.replace(decision, reason=f"{decision.reason}; {label}: {drift}")



@dataclass(frozen=True)
class VariantChoice:
    """Outcome of the variant gate: the fastest variant whose metric is within ``max_drop`` of
    the reference's. ``within_budget`` names every variant and whether it may be served."""

    chosen: str
    reason: str
    metric: str
    max_drop: float
    reference_value: float
    speedup: float                       # chosen speed / reference speed
    drop: float                          # reference metric - chosen metric
    within_budget: dict[str, bool] = field(default_factory=dict)
    drops: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def choose_variant(
    rows: Mapping[str, Mapping[str, float]],
    metric: str,
    max_drop: float,
    speed: str = "texts_per_s",
    reference: str = REFERENCE_VARIANT,
    floors: Mapping[str, float] | None = None,
    unit: str = "texts",
) -> VariantChoice:
    """Pick the variant to serve (pure). ``rows`` maps variant name -> its figures (``metric``
    and ``speed``, higher is better for both).

    A variant is within budget iff its ``metric`` is known and
    ``rows[reference][metric] - rows[v][metric] <= max_drop`` (1e-12 tolerance); the reference
    always is. ``floors`` (figure -> minimum) adds agreement checks: a variant other than the
    reference must also have each such figure known and ``>= minimum`` (1e-12 tolerance; e.g.
    the text embedder's ``mean_cosine_vs_fp32 >= 0.99``). Among those with a known, positive
    ``speed``, the fastest wins; ties go to the
    reference, then to the name that sorts first. A missing reference, or a reference without
    ``metric``, is an error: nothing can be judged against it. ``unit``: what ``speed`` counts
    per second, for the reason ("texts", "images").
    """
    if reference not in rows:
        raise ValueError(f"no {reference!r} variant to compare with (got {sorted(rows)})")
    ref = _as_float(rows[reference].get(metric))
    if math.isnan(ref):
        raise ValueError(f"the {reference!r} variant has no {metric!r}")
    if max_drop < 0:
        raise ValueError(f"max_drop must be >= 0, got {max_drop}")
    drops = {n: ref - _as_float(r.get(metric)) for n, r in rows.items()}
    low = {n: [f"{k} {_as_float(r.get(k)):.4f} < {v:g}" for k, v in (floors or {}).items()
               if not _as_float(r.get(k)) >= v - _FLOAT_TOL] for n, r in rows.items()}
    within = {n: (n == reference) or (not math.isnan(d) and d <= max_drop + _FLOAT_TOL
                                      and not low[n])
              for n, d in drops.items()}
    speeds = {n: _as_float(r.get(speed)) for n, r in rows.items()}
    ranked = sorted((n for n in rows if within[n] and speeds[n] > 0),
                    key=lambda n: (-speeds[n], n != reference, n))
    chosen = ranked[0] if ranked else reference
    base = speeds[reference]
    speedup = speeds[chosen] / base if base > 0 and speeds[chosen] > 0 else float("nan")
    over = sorted(n for n in rows if not within[n])
    reason = (f"{chosen}: fastest within {metric} drop <= {max_drop:g} of {reference} "
              f"({speeds[chosen]:.1f} {unit}/s, {speedup:.2f}x {reference}; {metric} "
              f"{_as_float(rows[chosen].get(metric)):.4f} vs {ref:.4f})")
    if over:
        reason += "; over budget: " + ", ".join(
            f"{n} (drop {drops[n]:+.4f}" + "".join(f", {x}" for x in low[n]) + ")" for n in over)
    return VariantChoice(chosen=chosen, reason=reason, metric=metric, max_drop=float(max_drop),
                         reference_value=ref, speedup=speedup, drop=drops[chosen],
                         within_budget=within, drops=drops)


def _num(v: float | None) -> str:
    return "" if v is None else repr(float(v))


def _as_float(v: Any) -> float:
    try:
        return float("nan") if v is None else float(v)
    except (TypeError, ValueError):
        return float("nan")
