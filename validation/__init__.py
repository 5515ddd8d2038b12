"""Data validation gate on Great Expectations (GX Core 1.x).

``validate(df, suite)`` runs a versioned expectation suite (JSON in ``validation/suites/``, or any
path to a suite JSON) against a DataFrame with the normalised columns ``text`` and ``label``, builds
the GX data docs and returns a :class:`ValidationReport`. Great Expectations is imported lazily, on
the first call: importing this package is cheap and has no side effects.
"""

from validation.gate import (ExpectationOutcome, SuiteError, UnknownSuiteError, ValidationReport,
                             load_suite_spec, resolve_suite, validate)

__all__ = ["ExpectationOutcome", "SuiteError", "UnknownSuiteError", "ValidationReport",
           "load_suite_spec", "resolve_suite", "validate"]
