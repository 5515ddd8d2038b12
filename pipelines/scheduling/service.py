"""The long-lived ``maas schedule`` process: an APScheduler ``BackgroundScheduler`` on the scoped
job store, its events turned into fires, run records and skips, until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path
from typing import Any

from apscheduler.events import EVENT_JOB_EXECUTED, EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED
from apscheduler.schedulers.background import BackgroundScheduler

from pipelines.scheduling.children import Children
from pipelines.scheduling.cron import build_trigger
from pipelines.scheduling.fire import FireRunner, FireSpec
from pipelines.scheduling.jobs import DUE, JOB_PREFIX, ScopedJobStore, job_id
from pipelines.scheduling.records import Store, fmt_time, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    """The ``maas schedule`` settings of one scheduler process."""

    retries: int = 2
    backoff_s: float = 30.0
    no_retry: frozenset[int] = frozenset({2, 3})
    misfire_grace_s: int = 3600
    shutdown_grace_s: float = 30.0
    timeout_s: float | None = None
    tz: str = "UTC"
    command: str | None = None
    run_now: bool = False

    def spec(self, path: Path, cfg: Any) -> FireSpec:
        return FireSpec(pipeline=cfg.name, path=str(path.resolve()), retries=self.retries,
                        backoff_s=self.backoff_s, no_retry=self.no_retry,
                        timeout_s=self.timeout_s, command=self.command)


def _sync_jobs(sched: BackgroundScheduler, jobstore: ScopedJobStore,
               items: list[tuple[Path, Any]], opts: ServeOptions) -> None:
    """One job per scheduled pipeline. A stored job keeps its next fire time (so fires missed
    while down are caught up) unless the schedule changed; a pipeline without a schedule loses
    its job."""
    for path, cfg in items:
        jid = job_id(cfg.name)
        try:
            old = jobstore.lookup_job(jid)
        except Exception as exc:  # noqa: BLE001 - e.g. stored by an older maas (other callable)
            log.warning("%s: stored job unreadable (%s): replaced", cfg.name, exc)
            old = None
        if not cfg.schedule:
            if old is not None:
                jobstore.remove_job(jid)
                log.info("%s: no schedule in %s any more: job removed", cfg.name, path)
            continue
        trigger = build_trigger(cfg.schedule, opts.tz)
        extra: dict[str, Any] = {}
        if opts.run_now:
            extra["next_run_time"] = utcnow()
        elif old is not None and repr(old.trigger) == repr(trigger) and old.next_run_time:
            extra["next_run_time"] = old.next_run_time
        sched.add_job(DUE, trigger, id=jid, name=cfg.name, replace_existing=True,
                      kwargs={"pipeline": cfg.name, "schedule": cfg.schedule, "tz": opts.tz},
                      **extra)


def _listener(store: Store, runner: FireRunner, misfire_grace_s: int):
    def on_event(event) -> None:
        name = event.job_id.removeprefix(JOB_PREFIX)
        if event.code == EVENT_JOB_EXECUTED:
            runner.submit(name, event.scheduled_run_time)
        elif event.code == EVENT_JOB_MAX_INSTANCES:
            runner.submit(name, event.scheduled_run_times[-1])  # busy: recorded as a skip
        elif event.code == EVENT_JOB_MISSED:
            fire = event.scheduled_run_time
            late = (utcnow() - fire).total_seconds()
            log.warning("%s: fire %s missed by %.0f s (> misfire grace %d s): skipped", name,
                        fmt_time(fire), late, misfire_grace_s)
            store.record(name, "missed", fire_time=fire,
                         note=f"{late:.0f} s late, misfire grace {misfire_grace_s} s")

    return on_event


def _on_signals(children: Children) -> list[int]:
    received: list[int] = []

    def on_signal(signum, _frame) -> None:
        received.append(signum)
        if len(received) > 1:
            children.killing.set()  # second signal: no grace
        children.stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    return received


def serve(items: list[tuple[Path, Any]], db_url: str, opts: ServeOptions) -> int:
    """Run the scheduler until SIGTERM/SIGINT; returns the exit code (0)."""
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("apscheduler").setLevel(logging.ERROR)  # we log skips/misses ourselves
    store = Store(db_url)
    store.create()
    children = Children(opts.shutdown_grace_s)
    runner = FireRunner(store, children, {c.name: opts.spec(p, c) for p, c in items if c.schedule})
    jobstore = ScopedJobStore(store.engine, [job_id(c.name) for _, c in items])
    sched = BackgroundScheduler(
        jobstores={"default": jobstore},
        job_defaults={"coalesce": True, "max_instances": 1,
                      "misfire_grace_time": opts.misfire_grace_s},
        timezone=timezone.utc,
    )
    sched.add_listener(_listener(store, runner, opts.misfire_grace_s),
                       EVENT_JOB_EXECUTED | EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)
    jobstore.start(sched, "default")
    _sync_jobs(sched, jobstore, items, opts)
    jobstore.shutdown()  # the scheduler starts it again
    received = _on_signals(children)
    sched.start()
    for _, cfg in items:
        job = sched.get_job(job_id(cfg.name)) if cfg.schedule else None
        if job is not None:
            log.info("scheduled %s: %r (%s), next fire %s", cfg.name, cfg.schedule, opts.tz,
                     fmt_time(job.next_run_time))
    log.info("scheduler running (store %s); SIGTERM or Ctrl-C stops it", store.shown_url())

    while not children.stopping.wait(1.0):
        pass
    log.info("%s: stopping (no new fires; running children get SIGTERM, SIGKILL after %g s)",
             signal.Signals(received[0]).name if received else "stop", opts.shutdown_grace_s)
    sched.pause()  # no new fires from here on
    children.stop_all()
    runner.wait_idle(30)  # the fire threads record their outcome, then return
    sched.shutdown(wait=False)
    store.engine.dispose()
    log.info("scheduler stopped")
    return 0
