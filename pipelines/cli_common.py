"""What every ``maas`` command shares: the exit codes and the one mapping of known failures to a
one-line ``error:`` message (credentials masked) and its exit code (``_errors``, ``_fail``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

DEFAULT_PIPELINE = Path(__file__).with_name("sentiment.yaml")
EXIT_CONFIG, EXIT_DATA, EXIT_REGISTRY, EXIT_BUSY = 2, 3, 4, 5


def _errors(fn):
    """Map the known failures to a one-paragraph message and an exit code; no tracebacks."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pipelines.config import ConfigError
        from pipelines.data import DataError
        from pipelines.families.base import FamilyError
        from pipelines.run import (
            RunInProgress,
            TrackingPermissionDenied,
            ValidationFailed,
            is_permission_error,
        )
        from validation import SuiteError, UnknownSuiteError

        try:
            return fn(*args, **kwargs)
        except (ConfigError, FamilyError, SuiteError, UnknownSuiteError) as exc:
            _fail(exc, EXIT_CONFIG)
        except (DataError, ValidationFailed) as exc:
            _fail(exc, EXIT_DATA)
        except RunInProgress as exc:
            _fail(exc, EXIT_BUSY)
        except TrackingPermissionDenied as exc:
            _fail(exc, EXIT_REGISTRY)
        except Exception as exc:
            from registry import RegistryError

            if isinstance(exc, RegistryError):
                _fail(exc, EXIT_REGISTRY)
            if is_permission_error(exc):
                _fail(f"permission denied on the tracking server: {exc}", EXIT_REGISTRY)
            raise

    return wrapper


def _fail(exc: object, code: int) -> None:
    """Print ``error: <message>`` (credentials masked) and exit with ``code``."""
    from pipelines.redact import redact

    click.echo(f"error: {redact(str(exc))}", err=True)
    sys.exit(code)
