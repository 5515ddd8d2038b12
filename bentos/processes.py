"""Stopping a child process group: SIGTERM, a grace period, then SIGKILL, then reap the leader.

The one helper for every child started with ``start_new_session=True`` (its pid is its process
group id): the bento server (``bentos.server``), the scheduler's runs
(``pipelines.scheduling.children``) and the test suite's servers (``tests/helpers.py``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable


def signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to process group ``pgid``; a group that is gone (or not ours) is skipped."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _running(proc: subprocess.Popen, whole_group: bool) -> bool:
    if proc.poll() is None:  # polling also reaps an exited leader, which would hold its group
        return True
    if not whole_group:
        return False
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


def stop_group(proc: subprocess.Popen, grace_s: float, *, whole_group: bool = False,
               give_up: Callable[[], bool] | None = None, reap_s: float | None = None,
               poll_s: float = 0.05) -> None:
    """SIGTERM the process group led by ``proc``, wait up to ``grace_s`` for it to end, SIGKILL
    the group if it has not, then wait ``reap_s`` seconds (None: as long as it takes) for
    ``proc`` itself (``subprocess.TimeoutExpired`` if it is still there).

    ``whole_group``: wait for every process of the group, not only ``proc``, before deciding on
    SIGKILL. ``give_up``: checked while waiting; true means SIGKILL now, without the rest of the
    grace."""
    signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _running(proc, whole_group):
        if time.monotonic() >= deadline or (give_up is not None and give_up()):
            signal_group(proc.pid, signal.SIGKILL)
            break
        time.sleep(poll_s)
    proc.wait(reap_s)
