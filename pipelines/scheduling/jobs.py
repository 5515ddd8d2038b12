"""The APScheduler job store: one job per scheduled pipeline in ``maas_scheduler_jobs``, scoped to
the pipelines of one scheduler process; and ``maas schedule --list`` (next fires, recent outcomes).

A stored job only marks *when* a pipeline fires (APScheduler keeps the next fire time across
restarts, coalesces and drops misfires); its callable, :func:`due`, does nothing. The fire itself
is carried out by :class:`~pipelines.scheduling.fire.FireRunner` on APScheduler's public
``EVENT_JOB_EXECUTED`` event, which carries the scheduled fire time."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timezone
from pathlib import Path
from typing import Any

from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore

from pipelines.scheduling.records import Store, fmt_time

JOBS_TABLE = "maas_scheduler_jobs"
JOB_PREFIX = "maas-pipeline:"
DUE = "pipelines.scheduling.jobs:due"  # the stored jobs' callable, by reference


def job_id(pipeline_name: str) -> str:
    return JOB_PREFIX + pipeline_name


def due(**_details: Any) -> None:
    """A fire is due (the job's kwargs name the pipeline, schedule and time zone for --list)."""


class ScopedJobStore(SQLAlchemyJobStore):
    """The SQLAlchemy job store, seeing only the given job ids: several schedulers (different
    pipeline sets) share the table without running each other's jobs. Public methods only."""

    def __init__(self, engine, ids: Iterable[str] | None) -> None:
        super().__init__(engine=engine, tablename=JOBS_TABLE)
        self.ids = frozenset(ids) if ids is not None else None

    def _mine(self, jobs: list) -> list:
        return jobs if self.ids is None else [j for j in jobs if j.id in self.ids]

    def get_due_jobs(self, now):
        return self._mine(super().get_due_jobs(now))

    def get_all_jobs(self):
        return self._mine(super().get_all_jobs())

    def get_next_run_time(self):
        # not the table's earliest: another scheduler's overdue job would wake this one forever
        times = [j.next_run_time for j in self.get_all_jobs() if j.next_run_time is not None]
        return min(times, default=None)


def _run_line(r: dict[str, Any]) -> str:
    secs = ""
    if r["started_at"] and r["ended_at"]:
        secs = f" {(r['ended_at'] - r['started_at']).total_seconds():.1f} s"
    code = "" if r["exit_code"] is None else f" exit {r['exit_code']}"
    attempt = "" if r["attempt"] is None else f" attempt {r['attempt']}"
    note = f"  ({r['note']})" if r["note"] else ""
    return f"    fire {fmt_time(r['fire_time'])}  {r['outcome']:<15}{attempt}{code}{secs}{note}"


def _stored_jobs(store: Store, wanted: list[str] | None) -> dict[str, Any]:
    from apscheduler.schedulers.background import BackgroundScheduler

    if not store.has_table(JOBS_TABLE):
        return {}
    js = ScopedJobStore(store.engine, [job_id(n) for n in wanted] if wanted else None)
    js.start(BackgroundScheduler(timezone=timezone.utc), "default")
    return {job.kwargs.get("pipeline") or job.name: job for job in js.get_all_jobs()}


def list_jobs(items: list[tuple[Path, Any]], db_url: str, last: int) -> str:
    """``--list``: per pipeline, its schedule and next fire, then its last ``last`` fires."""
    store = Store(db_url)
    wanted = [c.name for _, c in items] or None
    jobs = _stored_jobs(store, wanted)
    names = wanted or sorted(set(jobs) | set(store.pipelines_with_runs()))
    lines = [f"scheduler store: {store.shown_url()}"]
    if not names:
        lines.append("no scheduled pipelines")
    for name in names:
        job = jobs.get(name)
        if job is None:
            lines.append(f"{name}: not scheduled (no job in the store)")
        else:
            sched = job.kwargs.get("schedule", str(job.trigger))
            lines.append(f"{name}: schedule {sched!r} ({job.kwargs.get('tz', 'UTC')}), "
                         f"next fire {fmt_time(job.next_run_time)}")
        runs = store.last_runs(name, last)[::-1]  # oldest first
        lines.extend(_run_line(r) for r in runs)
        if not runs:
            lines.append("    no recorded fires")
    store.engine.dispose()
    return "\n".join(lines)
