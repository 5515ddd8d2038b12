"""One fire of one pipeline: take its lock, run ``maas run`` in a child process, retry failures
with exponential backoff, record every attempt. :class:`FireRunner` runs fires in threads, never
two of one pipeline at once in this process."""

from __future__ import annotations

import logging
import shlex
import sys
import threading
from dataclasses import dataclass
from datetime import datetime

from pipelines.scheduling.children import Children
from pipelines.scheduling.locks import pipeline_lock
from pipelines.scheduling.records import Store, fmt_time, utcnow

log = logging.getLogger(__name__)

_WHY = {2: "config/usage error", 3: "data validation failed"}


@dataclass(frozen=True)
class FireSpec:
    """What a fire of one pipeline runs, and its retry policy."""

    pipeline: str
    path: str
    retries: int = 2
    backoff_s: float = 30.0
    no_retry: frozenset[int] = frozenset({2, 3})
    timeout_s: float | None = None
    command: str | None = None  # testing: a template instead of `maas run` ({pipeline}, {name},
    #                             {python}, {attempt}, {fire_time} are substituted)

    def argv(self, attempt: int, fire_time: datetime) -> list[str]:
        """The child's command line for ``attempt`` (1-based) of the fire at ``fire_time``."""
        if self.command:
            values = {"pipeline": self.path, "name": self.pipeline, "python": sys.executable,
                      "attempt": attempt, "fire_time": fire_time.isoformat()}
            return [part.format(**values) for part in shlex.split(self.command)]
        return [sys.executable, "-m", "pipelines.cli", "run", self.path, "--trigger", "schedule",
                "--schedule-attempt", str(attempt)]


@dataclass(frozen=True)
class Verdict:
    """What an attempt's exit means: the outcome recorded, its note, the wait before a retry."""

    outcome: str  # success | failed | retrying | interrupted
    note: str | None
    delay_s: float = 0.0


def _join(note: str | None, more: str) -> str:
    return f"{note}; {more}" if note else more


def judge(code: int, note: str | None, attempt: int, spec: FireSpec, stopping: bool) -> Verdict:
    """The verdict on ``attempt`` (1-based) that exited with ``code``: a pure decision."""
    if code == 0:
        return Verdict("success", note)
    if stopping:
        return Verdict("interrupted", note or "scheduler shutting down")
    if code in spec.no_retry:
        why = f" ({_WHY[code]})" if code in _WHY else ""
        return Verdict("failed", f"exit {code}{why}: not retried")
    if attempt > spec.retries:
        return Verdict("failed", _join(note, f"gave up after {attempt} attempt(s)"))
    delay = spec.backoff_s * 2 ** (attempt - 1)
    return Verdict("retrying", _join(note, f"retry in {delay:g} s"), delay)


def fire(store: Store, children: Children, spec: FireSpec, fire_time: datetime) -> str:
    """Run the fire at ``fire_time`` to its end (success, final failure, shutdown); its outcome."""
    lock = pipeline_lock(store.url, spec.pipeline)
    if not lock.acquire(wait=False):
        note = f"pipeline is running elsewhere (lock held by {lock.holder()})"
        log.warning("%s: fire %s skipped: %s", spec.pipeline, fmt_time(fire_time), note)
        store.record(spec.pipeline, "skipped_overlap", fire_time=fire_time, note=note)
        return "skipped_overlap"
    try:
        attempt = 1
        while True:
            verdict = _attempt(store, children, spec, fire_time, attempt, lock.inheritable_fds())
            if verdict.outcome != "retrying":
                return verdict.outcome
            attempt += 1
            if children.stopping.wait(verdict.delay_s):
                store.record(spec.pipeline, "interrupted", fire_time=fire_time, attempt=attempt,
                             note="scheduler shut down during the retry backoff")
                return "interrupted"
    finally:
        lock.release()


def _attempt(store: Store, children: Children, spec: FireSpec, fire_time: datetime,
             attempt: int, pass_fds: tuple[int, ...]) -> Verdict:
    argv = spec.argv(attempt, fire_time)
    started = utcnow()
    log.info("%s: fire %s attempt %d: %s", spec.pipeline, fmt_time(fire_time), attempt,
             shlex.join(argv))
    try:
        proc = children.spawn(argv, pass_fds=pass_fds)
    except OSError as exc:
        code, note = 127, f"could not start {argv[0]!r}: {exc}"
    else:
        if proc is None:
            verdict = Verdict("interrupted", "scheduler shutting down: not started")
            store.record(spec.pipeline, verdict.outcome, fire_time=fire_time, attempt=attempt,
                         note=verdict.note)
            return verdict
        code, note = children.wait(proc, spec.timeout_s)
    ended = utcnow()
    verdict = judge(code, note, attempt, spec, children.stopping.is_set())
    level = {"success": logging.INFO, "retrying": logging.WARNING}.get(verdict.outcome,
                                                                       logging.ERROR)
    log.log(level, "%s: attempt %d %s (exit %s, %.1f s)%s", spec.pipeline, attempt,
            verdict.outcome, code, (ended - started).total_seconds(),
            f": {verdict.note}" if verdict.note else "")
    store.record(spec.pipeline, verdict.outcome, fire_time=fire_time, attempt=attempt,
                 started_at=started, ended_at=ended, exit_code=code, note=verdict.note)
    return verdict


class FireRunner:
    """Carries out the fires APScheduler reports, each in its own thread; a fire of a pipeline
    whose previous fire (or its retries) is still going is skipped and recorded."""

    def __init__(self, store: Store, children: Children, specs: dict[str, FireSpec]) -> None:
        self.store, self.children, self.specs = store, children, specs
        self._busy: set[str] = set()
        self._idle = threading.Condition()

    def submit(self, pipeline: str, fire_time: datetime) -> None:
        spec = self.specs.get(pipeline)
        if spec is None:
            log.warning("%s: fire for a pipeline this scheduler does not run: ignored", pipeline)
            return
        with self._idle:
            busy = pipeline in self._busy
            self._busy.add(pipeline)
        if busy:
            log.warning("%s: fire %s skipped: the previous run is still going", pipeline,
                        fmt_time(fire_time))
            self.store.record(pipeline, "skipped_overlap", fire_time=fire_time,
                              note="previous run (or its retries) still going in this scheduler")
            return
        threading.Thread(target=self._run, args=(spec, fire_time), name=f"fire-{pipeline}",
                         daemon=True).start()

    def _run(self, spec: FireSpec, fire_time: datetime) -> None:
        try:
            fire(self.store, self.children, spec, fire_time)
        except Exception as exc:
            log.exception("%s: scheduler error", spec.pipeline)
            self.store.record(spec.pipeline, "failed", fire_time=fire_time,
                              note=f"scheduler error: {exc}")
        finally:
            with self._idle:
                self._busy.discard(spec.pipeline)
                self._idle.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no fire is going (their outcomes are recorded); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._busy, timeout=timeout_s)
