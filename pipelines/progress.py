"""Progress bars on a terminal only.

A tqdm bar redraws itself with carriage returns: on a terminal that is one live line, in a log
file (stderr redirected: the scheduler, CI, ``nohup``) it is thousands. So bars are drawn only when
their stream is a TTY; the code that drives them logs one line per epoch / per trial instead
(see :mod:`pipelines.tuning`).
"""

from __future__ import annotations

import sys
from typing import IO, Any


def bars_enabled(stream: IO[str] | None = None) -> bool:
    """True when ``stream`` (default: the current ``sys.stderr``) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def progress(iterable: Any = None, *, enabled: bool = True, **kwargs: Any):
    """A ``tqdm`` bar on stderr, drawn only when stderr is a terminal (and ``enabled``)."""
    from tqdm.auto import tqdm

    stream = kwargs.pop("file", None) or sys.stderr
    return tqdm(iterable, file=stream, disable=not (enabled and bars_enabled(stream)),
                dynamic_ncols=True, **kwargs)
