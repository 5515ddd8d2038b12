"""The child processes of one scheduler process: each run is started in its own process group,
waited for (with an optional timeout), and stopped with SIGTERM, then SIGKILL after a grace."""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
from collections.abc import Sequence

from bentos.processes import stop_group

log = logging.getLogger(__name__)


def _signal_note(code: int | None) -> str | None:
    if code is None or code >= 0:
        return None
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


class Children:
    """Running children and the shutdown flags: ``stopping`` (no new child; set on the first
    SIGTERM/SIGINT) and ``killing`` (no grace left; set on the second)."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.stopping = threading.Event()
        self.killing = threading.Event()
        self._lock = threading.Lock()
        self._running: dict[int, subprocess.Popen] = {}

    def spawn(self, command: Sequence[str], *,
              pass_fds: Sequence[int] = ()) -> subprocess.Popen | None:
        """Start ``command`` in a new session; None once stopping (checked atomically with
        :meth:`stop_all`'s snapshot, so no child escapes a shutdown). Raises OSError."""
        with self._lock:
            if self.stopping.is_set():
                return None
            proc = subprocess.Popen(list(command), start_new_session=True,
                                    pass_fds=tuple(pass_fds))
            self._running[proc.pid] = proc
            return proc

    def wait(self, proc: subprocess.Popen, timeout_s: float | None) -> tuple[int, str | None]:
        """The child's exit code (negative: killed by that signal) and a note on how it ended."""
        note = None
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            note = f"timed out after {timeout_s:g} s"
            log.error("pid %d %s: stopping it", proc.pid, note)
            self.stop(proc)
        finally:
            with self._lock:
                self._running.pop(proc.pid, None)
        killed = _signal_note(proc.returncode)
        if killed:
            note = f"{note}; {killed}" if note else killed
        return proc.returncode, note

    def stop(self, proc: subprocess.Popen) -> None:
        """SIGTERM the child's process group, SIGKILL it after the grace (at once if killing)."""
        stop_group(proc, self.grace_s, give_up=self.killing.is_set)

    def stop_all(self) -> None:
        """Shutdown: no new child from here on; stop the running ones in parallel."""
        with self._lock:
            self.stopping.set()
            running = list(self._running.values())
        threads = [threading.Thread(target=self.stop, args=(p,), daemon=True) for p in running]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
