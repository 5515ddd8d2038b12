"""Data validation gate on Great Expectations (GX Core 1.x).

``validate(df, suite)`` runs a versioned expectation suite (JSON in ``validation/suites/``, or any
path to a suite JSON) against a DataFrame with the normalised columns ``text`` and ``label``,
builds the GX data docs and returns a :class:`ValidationReport`. Great Expectations is imported
lazily, on the first call: importing this package is cheap and has no side effects.
``draft_suite(df, name)`` (``validation/profile.py``) drafts a suite dict from a trusted sample,
without GX.
``profile_data`` / ``compare`` (``validation/drift.py``): text-free training-data profiles and the
drift figures between two of them (scipy.stats), judged as a :class:`DriftReport`.
"""

from validation.drift import (
                              DataProfile,
                              DriftFigure,
                              DriftReport,
                              DriftThresholds,
                              compare,
                              profile_data,
)
from validation.gate import (
                              ExpectationOutcome,
                              SuiteError,
                              UnknownSuiteError,
                              ValidationReport,
                              load_suite_spec,
                              resolve_suite,
                              validate,
)
from validation.pii import loggable_texts, pii_expectations, redact_text, scrub
from validation.profile import ProfileError, draft_suite

__all__ = ["DataProfile", "DriftFigure", "DriftReport", "DriftThresholds", "ExpectationOutcome",
           "ProfileError", "SuiteError", "UnknownSuiteError", "ValidationReport", "compare",
           "draft_suite", "load_suite_spec", "profile_data", "resolve_suite", "validate"]
__all__ += ["loggable_texts", "pii_expectations", "redact_text", "scrub"]  # validation/pii.py
