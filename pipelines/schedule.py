"""`maas schedule`: run pipelines on their cron schedules (APScheduler 3.x), list, export them.

One long-lived process (a ``BackgroundScheduler``) keeps one job per scheduled pipeline in a
``SQLAlchemyJobStore`` table (``maas_scheduler_jobs``) of the same database as MLflow tracking, and
records every fire in ``maas_schedule_runs`` beside it. Each fire runs the pipeline in a child
process, ``python -m pipelines.cli run PIPELINE --trigger schedule``, so a crash or an OOM kill
of a run never takes the scheduler down, and each run is an MLflow run tagged
``maas.trigger=schedule``.

Policies (docs/scheduling.md says the same for users):

* overlap: never two runs of one pipeline at once. ``max_instances=1`` inside the process, and a
  cross-process lock keyed by the pipeline name (``pg_try_advisory_lock`` on PostgreSQL, else an
  ``flock`` file beside the SQLite database, inherited by the child so it stays held while the run
  lives). A fire that finds the pipeline busy is skipped and recorded as ``skipped_overlap``.
* retry: a failed run is retried ``--retries`` times (default 2) after ``--retry-backoff`` seconds,
  doubling each time (30 s, 60 s), inside the same fire (so the lock is held and fires during the
  retries are skipped). Exit codes 2 (config/usage) and 3 (data validation) are never retried.
* misfire: ``coalesce=True`` and ``misfire_grace_time=--misfire-grace`` (default 3600 s). Fires
  missed while the scheduler was down collapse into the latest one, which runs once on start-up if
  it is less than the grace old; otherwise it is recorded as ``missed`` and the next fire is
  waited for. The stored next fire time survives restarts as long as the schedule is unchanged.
* shutdown: on SIGTERM/SIGINT no new fire starts, running children get SIGTERM (their process
  group), then SIGKILL after ``--shutdown-grace`` seconds (default 30; a second signal kills at
  once); their fires are recorded as ``interrupted`` (a killed ``maas run`` is resumed by the next
  run, see pipelines/run.py); the process exits 0 and the job store keeps the next fire times.

Schedules are cron strings in the pipeline file's ``schedule`` field: 5 fields (standard cron,
``0``/``7`` = Sunday; ``@hourly``/``@daily``/``@weekly``/``@monthly``/``@yearly`` too) or 6 fields
with a leading seconds field (``*/5 * * * * *`` = every 5 s; for tests and development, not
exportable to Kubernetes). The time zone is ``--timezone`` (default UTC).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

log = logging.getLogger("maas.schedule")

JOBS_TABLE = "maas_scheduler_jobs"
RUNS_TABLE = "maas_schedule_runs"
JOB_PREFIX = "maas-pipeline:"
EXIT_CONFIG = 2
NO_RETRY_DEFAULT = "2,3"  # config/usage errors and data-validation failures won't fix themselves
DEFAULT_IMAGE = "registry.example.com/maas:latest"
FALLBACK_DB = "maas-schedule.db"

OUTCOMES = ("success", "failed", "retrying", "skipped_overlap", "missed", "interrupted")


def job_id(pipeline_name: str) -> str:
    return JOB_PREFIX + pipeline_name


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _naive_utc(dt: datetime | None) -> datetime | None:
    """Stored timestamps are naive UTC (SQLite has no time zones)."""
    if dt is None:
        return None
    if dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc).replace(tzinfo=None)
    return dt


def _fmt(dt: datetime | str | None) -> str:
    if dt is None:
        return "-"
    if isinstance(dt, str):
        dt = datetime.fromisoformat(dt)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


# --------------------------------------------------------------------------- cron expressions

MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
          "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
          "@hourly": "0 * * * *"}
_DOW_NAMES = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]  # standard cron: 0 (and 7) = Sunday


class ScheduleError(ValueError):
    """A schedule string that cannot be used."""


def normalize_cron(expr: str) -> list[str]:
    """The cron fields of ``expr``: 5 (standard) or 6 (leading seconds); macros expanded."""
    expr = (expr or "").strip()
    expr = MACROS.get(expr.lower(), expr)
    fields = expr.split()
    if len(fields) not in (5, 6):
        raise ScheduleError(f"schedule {expr!r}: expected 5 cron fields (minute hour day month "
                            f"weekday) or 6 with leading seconds, got {len(fields)}")
    return fields


def _day_of_week(spec: str) -> str:
    """Standard-cron weekday field (0/7 = Sunday) -> APScheduler's (names; its 0 is Monday)."""
    if spec in ("*", "?"):
        return "*"
    days: set[int] = set()
    for item in spec.lower().split(","):
        rng, _, step_s = item.partition("/")
        step = int(step_s) if step_s else 1
        if step < 1:
            raise ValueError(f"bad step in {item!r}")

        def val(tok: str) -> int:
            if tok in _DOW_NAMES:
                return _DOW_NAMES.index(tok)
            n = int(tok)
            if not 0 <= n <= 7:
                raise ValueError(f"weekday {n} out of range 0-7")
            return n

        if rng in ("*", "?"):
            lo, hi = 0, 6
        elif "-" in rng:
            a, b = rng.split("-", 1)
            lo, hi = val(a), val(b)
            if lo > hi:
                raise ValueError(f"range {rng!r} goes backwards")
        else:
            lo = val(rng)
            hi = 6 if step_s else lo
        days.update(d % 7 for d in range(lo, hi + 1, step))
    if len(days) == 7:
        return "*"
    return ",".join(_DOW_NAMES[d] for d in sorted(days))


def build_trigger(expr: str, tz: str = "UTC"):
    """A ``CronTrigger`` for a 5-field (``CronTrigger.from_crontab``) or 6-field cron string."""
    from apscheduler.triggers.cron import CronTrigger

    fields = normalize_cron(expr)
    try:
        if len(fields) == 5:
            fields[4] = _day_of_week(fields[4])
            return CronTrigger.from_crontab(" ".join(fields), timezone=tz)
        second, minute, hour, day, month, dow = fields
        return CronTrigger(second=second, minute=minute, hour=hour, day=day, month=month,
                           day_of_week=_day_of_week(dow), timezone=tz)
    except (ValueError, KeyError, LookupError) as exc:
        raise ScheduleError(f"schedule {expr!r}: {exc}") from None


# --------------------------------------------------------------------------- the database

def tracking_uri_of(cfg: Any | None) -> str:
    """As ``maas run`` resolves it: the pipeline's tracking_uri, else MLFLOW_TRACKING_URI, else
    MLflow's default (``sqlite:///mlflow.db`` in the working directory)."""
    if cfg is not None and getattr(cfg, "tracking_uri", None):
        return cfg.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    # MLflow's own resolution (sqlite:///mlflow.db, or a legacy ./mlruns file store that holds
    # runs; artifacts of the SQLite default also live in ./mlruns, which MLflow tells apart)
    import mlflow

    return mlflow.get_tracking_uri()


_DB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mssql", "oracle")


def store_url(tracking_uri: str) -> str | None:
    """The SQLAlchemy URL of a database tracking store (None for a server or a file store)."""
    scheme = tracking_uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in tracking_uri else ""
    if scheme not in _DB_SCHEMES:
        return None
    if scheme == "postgres":  # MLflow accepts it, SQLAlchemy 2 does not
        return "postgresql" + tracking_uri[len("postgres"):]
    return tracking_uri


def resolve_db(cfgs: list[Any], db: str | None) -> str:
    if db:
        return store_url(db) or db
    urls = {store_url(tracking_uri_of(c)) for c in (cfgs or [None])}
    if len(urls) > 1:
        shown = ", ".join(sorted(str(u) for u in urls))
        raise ScheduleError(f"the pipelines use different tracking stores ({shown}); "
                            "pass --db URL for the scheduler's tables")
    url = urls.pop()
    if url is None:
        url = f"sqlite:///{Path.cwd() / FALLBACK_DB}"
        log.warning("the MLflow tracking store is not a database; scheduler tables go to %s "
                    "(pass --db to choose)", url)
    return url


def _engine(url: str):
    import sqlalchemy as sa

    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}  # maas run writes the same file meanwhile
    return sa.create_engine(url, **kwargs)


def _runs_table(metadata):
    import sqlalchemy as sa

    return sa.Table(
        RUNS_TABLE, metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("pipeline", sa.String(200), nullable=False, index=True),
        sa.Column("fire_time", sa.DateTime),
        sa.Column("attempt", sa.Integer),
        sa.Column("started_at", sa.DateTime),
        sa.Column("ended_at", sa.DateTime),
        sa.Column("exit_code", sa.Integer),
        sa.Column("outcome", sa.String(32), nullable=False),
        sa.Column("note", sa.Text),
        sa.Column("host", sa.String(255)),
        sa.Column("pid", sa.Integer),
    )


class Store:
    """The scheduler's two tables (jobs via APScheduler, runs via SQLAlchemy Core) and locks."""

    def __init__(self, url: str) -> None:
        import sqlalchemy as sa

        self.url = url
        self.engine = _engine(url)
        self.runs = _runs_table(sa.MetaData())
        self.is_pg = self.engine.dialect.name == "postgresql"

    def create(self) -> None:
        self.runs.create(self.engine, checkfirst=True)

    def has_table(self, name: str) -> bool:
        import sqlalchemy as sa

        db = self.engine.url.database
        if self.engine.dialect.name == "sqlite" and db and db != ":memory:" \
                and not Path(db).exists():
            return False  # don't create the file just to look
        return sa.inspect(self.engine).has_table(name)

    def record(self, pipeline: str, outcome: str, *, fire_time: datetime | None = None,
               attempt: int | None = None, started_at: datetime | None = None,
               ended_at: datetime | None = None, exit_code: int | None = None,
               note: str | None = None) -> None:
        row = dict(pipeline=pipeline, outcome=outcome, fire_time=_naive_utc(fire_time),
                   attempt=attempt, started_at=_naive_utc(started_at),
                   ended_at=_naive_utc(ended_at), exit_code=exit_code, note=note,
                   host=socket.gethostname(), pid=os.getpid())
        try:
            with self.engine.begin() as conn:
                conn.execute(self.runs.insert().values(**row))
        except Exception as exc:  # never let bookkeeping kill a fire
            log.warning("could not record %s outcome %s: %s", pipeline, outcome, exc)

    def last_runs(self, pipeline: str, n: int) -> list[dict[str, Any]]:
        import sqlalchemy as sa

        if not self.has_table(RUNS_TABLE):
            return []
        q = (sa.select(self.runs).where(self.runs.c.pipeline == pipeline)
             .order_by(self.runs.c.id.desc()).limit(n))
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def pipelines_with_runs(self) -> list[str]:
        import sqlalchemy as sa

        if not self.has_table(RUNS_TABLE):
            return []
        with self.engine.connect() as conn:
            return sorted(r[0] for r in conn.execute(sa.select(self.runs.c.pipeline).distinct()))

    def lock(self, pipeline: str) -> _PgLock | _FileLock:
        if self.is_pg:
            return _PgLock(self.engine, pipeline)
        db = self.engine.url.database if self.engine.dialect.name == "sqlite" else None
        folder = (Path(db).resolve().parent if db and db != ":memory:" else Path.cwd())
        return _FileLock(folder / ".maas-locks" / f"schedule-{_safe(pipeline)}.lock")


@contextlib.contextmanager
def manual_run_lock(cfg: Any):
    """Hold the per-pipeline lock the scheduler takes, for a run started by hand: a manual run
    and a scheduled run of the same pipeline never overlap. A run started *by* the scheduler
    (``MAAS_SCHEDULE_PIPELINE`` set) already runs under its lock; a tracking store that is not a
    database (an MLflow server) has no lock to take. Raises :class:`PipelineBusy`."""
    url = store_url(tracking_uri_of(cfg))
    if os.environ.get("MAAS_SCHEDULE_PIPELINE") or url is None:
        yield
        return
    lock = Store(url).lock(cfg.name)
    if not lock.acquire():
        raise PipelineBusy(f"pipeline {cfg.name!r} is already running ({lock.holder()}): a run "
                           "started by hand never overlaps another run of the same pipeline, "
                           "scheduled or manual; try again when it has finished")
    try:
        yield
    finally:
        lock.release()


class PipelineBusy(RuntimeError):
    """Another run of the pipeline (scheduled or manual) holds its lock."""


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class _FileLock:
    """``flock`` on a file; the child inherits the descriptor, so the lock lives as long as the run
    even if the scheduler itself is killed."""

    def __init__(self, path: Path) -> None:
        self.path, self.fd = path, None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()} since {_fmt(_utcnow())}\n"
                 .encode())
        self.fd = fd
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def inheritable_fds(self) -> tuple[int, ...]:
        return (self.fd,) if self.fd is not None else ()

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the lock goes when the last descriptor (ours, the child's) closes
            self.fd = None


class _PgLock:
    """A session-level PostgreSQL advisory lock keyed by the pipeline name, held on its own
    connection for the whole fire (all attempts)."""

    def __init__(self, engine, pipeline: str) -> None:
        digest = hashlib.sha256(f"maas.schedule:{pipeline}".encode()).digest()
        self.key = int.from_bytes(digest[:8], "big", signed=True)
        self.engine, self.conn = engine, None

    def acquire(self) -> bool:
        import sqlalchemy as sa

        conn = self.engine.connect()
        got = conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar()
        conn.commit()  # the lock is the session's; don't sit idle in a transaction
        if not got:
            conn.close()
            return False
        self.conn = conn
        return True

    def holder(self) -> str:
        return "another session (PostgreSQL advisory lock)"

    def inheritable_fds(self) -> tuple[int, ...]:
        return ()

    def release(self) -> None:
        import sqlalchemy as sa

        if self.conn is None:
            return
        try:
            self.conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            self.conn.commit()
            self.conn.close()
        except Exception:
            self.conn.invalidate()  # closing the session drops the lock too
        self.conn = None


# --------------------------------------------------------------------------- the running scheduler

@dataclass
class _Runtime:
    """State of the scheduler process shared by the job threads and the main thread."""

    store: Store
    shutdown_grace: float
    stopping: threading.Event = field(default_factory=threading.Event)
    killing: threading.Event = field(default_factory=threading.Event)
    children: dict[int, subprocess.Popen] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    active: int = 0
    idle: threading.Condition = field(default_factory=threading.Condition)


_RUNTIME: _Runtime | None = None
_local = threading.local()


def _fire_time_executor(max_workers: int):
    """A thread-pool executor that tells the job function which fire (scheduled time) it runs."""
    from apscheduler.executors.base import run_job
    from apscheduler.executors.pool import ThreadPoolExecutor

    def run_with_fire_time(job, alias, run_times, logger_name):
        _local.fire_time = run_times[-1]
        try:
            return run_job(job, alias, run_times, logger_name)
        finally:
            _local.fire_time = None

    class FireTimeExecutor(ThreadPoolExecutor):
        def _do_submit_job(self, job, run_times):  # as BasePoolExecutor's, with our wrapper
            def callback(f):
                exc = f.exception()
                if exc:
                    self._run_job_error(job.id, exc, getattr(exc, "__traceback__", None))
                else:
                    self._run_job_success(job.id, f.result())

            f = self._pool.submit(run_with_fire_time, job, job._jobstore_alias, run_times,
                                  self._logger.name)
            f.add_done_callback(callback)

    return FireTimeExecutor(max_workers)


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_child(proc: subprocess.Popen, grace: float, rt: _Runtime | None = None) -> None:
    """SIGTERM the child's process group, SIGKILL it after ``grace`` seconds."""
    _kill_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while proc.poll() is None and time.monotonic() < deadline:
        if rt is not None and rt.killing.is_set():
            break
        time.sleep(0.05)
    if proc.poll() is None:
        _kill_group(proc, signal.SIGKILL)
    proc.wait()


def run_scheduled(*, pipeline: str, path: str, command: list[str], retries: int,
                  backoff_s: float, no_retry: list[int], timeout_s: float | None,
                  schedule: str = "", tz: str = "UTC") -> str:
    """The job: one fire of one pipeline, with its retries. Runs in a scheduler thread."""
    rt = _RUNTIME
    if rt is None:  # a job loaded by some other process than `maas schedule`
        raise RuntimeError("run_scheduled needs a running `maas schedule` process")
    fire_time = getattr(_local, "fire_time", None) or _utcnow()
    with rt.idle:
        rt.active += 1
    try:
        return _fire(rt, pipeline, path, command, retries, backoff_s, set(no_retry), timeout_s,
                     fire_time)
    except Exception as exc:
        log.exception("%s: scheduler error", pipeline)
        rt.store.record(pipeline, "failed", fire_time=fire_time, note=f"scheduler error: {exc}")
        return "failed"
    finally:
        with rt.idle:
            rt.active -= 1
            rt.idle.notify_all()


def _fire(rt: _Runtime, pipeline: str, path: str, command: list[str], retries: int,
          backoff_s: float, no_retry: set[int], timeout_s: float | None,
          fire_time: datetime) -> str:
    lock = rt.store.lock(pipeline)
    if not lock.acquire():
        note = f"pipeline is running elsewhere (lock held by {lock.holder()})"
        log.warning("%s: fire %s skipped: %s", pipeline, _fmt(fire_time), note)
        rt.store.record(pipeline, "skipped_overlap", fire_time=fire_time, note=note)
        return "skipped_overlap"
    try:
        attempt = 0
        while True:
            attempt += 1
            env = {**os.environ, "MAAS_SCHEDULE_PIPELINE": pipeline,
                   "MAAS_SCHEDULE_ATTEMPT": str(attempt),
                   "MAAS_SCHEDULE_FIRE_TIME": fire_time.isoformat()}
            with rt.lock:
                if rt.stopping.is_set():
                    rt.store.record(pipeline, "interrupted", fire_time=fire_time,
                                    attempt=attempt, note="scheduler shutting down: not started")
                    return "interrupted"
                started = _utcnow()
                log.info("%s: fire %s attempt %d: %s", pipeline, _fmt(fire_time), attempt,
                         shlex.join(command))
                try:
                    proc = subprocess.Popen(command, env=env, start_new_session=True,
                                            pass_fds=lock.inheritable_fds())
                except OSError as exc:
                    proc = None
                    spawn_error = exc
                else:
                    rt.children[proc.pid] = proc
            if proc is None:
                code, note = 127, f"could not start {command[0]!r}: {spawn_error}"
            else:
                code, note = _wait_child(rt, proc, timeout_s)
            ended = _utcnow()
            rec = dict(fire_time=fire_time, attempt=attempt, started_at=started,
                       ended_at=ended, exit_code=code)
            if code == 0:
                log.info("%s: run succeeded (attempt %d, %.1f s)", pipeline, attempt,
                         (ended - started).total_seconds())
                rt.store.record(pipeline, "success", **rec, note=note)
                return "success"
            if rt.stopping.is_set():
                log.warning("%s: run interrupted by shutdown (exit %s)", pipeline, code)
                rt.store.record(pipeline, "interrupted", **rec,
                                note=note or "scheduler shutting down")
                return "interrupted"
            if code in no_retry:
                why = {2: "config/usage error", 3: "data validation failed"}.get(code, "")
                note = f"exit {code}{f' ({why})' if why else ''}: not retried"
                log.error("%s: run failed, %s", pipeline, note)
                rt.store.record(pipeline, "failed", **rec, note=note)
                return "failed"
            if attempt > retries:
                note = (note + "; " if note else "") + f"gave up after {attempt} attempt(s)"
                log.error("%s: run failed (exit %s), %s", pipeline, code, note)
                rt.store.record(pipeline, "failed", **rec, note=note)
                return "failed"
            delay = backoff_s * 2 ** (attempt - 1)
            note = (note + "; " if note else "") + f"retry in {delay:g} s"
            log.warning("%s: run failed (exit %s), %s", pipeline, code, note)
            rt.store.record(pipeline, "retrying", **rec, note=note)
            if rt.stopping.wait(delay):
                rt.store.record(pipeline, "interrupted", fire_time=fire_time, attempt=attempt + 1,
                                note="scheduler shut down during the retry backoff")
                return "interrupted"
    finally:
        lock.release()


def _wait_child(rt: _Runtime, proc: subprocess.Popen,
                timeout_s: float | None) -> tuple[int, str | None]:
    note = None
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        note = f"timed out after {timeout_s:g} s"
        log.error("pid %d %s: stopping it", proc.pid, note)
        _stop_child(proc, rt.shutdown_grace, rt)
    finally:
        with rt.lock:
            rt.children.pop(proc.pid, None)
    code = proc.returncode
    if code is not None and code < 0:
        sig = -code
        try:
            signame = signal.Signals(sig).name
        except ValueError:
            signame = f"signal {sig}"
        note = (note + "; " if note else "") + f"killed by {signame}"
    return code, note


def _scoped_jobstore(engine, ids: Iterable[str] | None):
    """The SQLAlchemy job store, seeing only this process's pipelines' jobs: several schedulers
    (different pipeline sets) can share the table without running each other's jobs."""
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from sqlalchemy import null, select

    wanted = sorted(ids) if ids is not None else None

    class ScopedJobStore(SQLAlchemyJobStore):
        def _get_jobs(self, *conditions):
            if wanted is not None:
                conditions = (*conditions, self.jobs_t.c.id.in_(wanted))
            return super()._get_jobs(*conditions)

        def get_next_run_time(self):
            from apscheduler.util import utc_timestamp_to_datetime

            q = (select(self.jobs_t.c.next_run_time)
                 .where(self.jobs_t.c.next_run_time != null())
                 .order_by(self.jobs_t.c.next_run_time).limit(1))
            if wanted is not None:
                q = q.where(self.jobs_t.c.id.in_(wanted))
            with self.engine.begin() as conn:
                return utc_timestamp_to_datetime(conn.execute(q).scalar())

    return ScopedJobStore(engine=engine, tablename=JOBS_TABLE)


@dataclass
class _Options:
    retries: int
    backoff_s: float
    no_retry: list[int]
    misfire_grace_s: int
    shutdown_grace_s: float
    timeout_s: float | None
    tz: str
    command: str | None
    run_now: bool


def _pipeline_command(path: Path, override: str | None, name: str) -> list[str]:
    if override:
        return [part.format(pipeline=str(path), name=name, python=sys.executable)
                for part in shlex.split(override)]
    return [sys.executable, "-m", "pipelines.cli", "run", str(path), "--trigger", "schedule"]


def serve(items: list[tuple[Path, Any]], db_url: str, opts: _Options) -> int:
    """Run the scheduler until SIGTERM/SIGINT; returns the exit code (0)."""
    from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED
    from apscheduler.schedulers.background import BackgroundScheduler

    global _RUNTIME
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("apscheduler").setLevel(logging.ERROR)  # we log skips/misses ourselves
    store = Store(db_url)
    store.create()
    rt = _RUNTIME = _Runtime(store=store, shutdown_grace=opts.shutdown_grace_s)

    scheduled = [(p, c) for p, c in items if c.schedule]
    ids = [job_id(c.name) for _, c in items]
    jobstore = _scoped_jobstore(store.engine, ids)
    sched = BackgroundScheduler(
        jobstores={"default": jobstore},
        executors={"default": _fire_time_executor(max(4, len(scheduled) + 2))},
        job_defaults={"coalesce": True, "max_instances": 1,
                      "misfire_grace_time": opts.misfire_grace_s},
        timezone=timezone.utc,
    )

    def on_event(event) -> None:
        name = event.job_id.removeprefix(JOB_PREFIX)
        if event.code == EVENT_JOB_MAX_INSTANCES:
            fire = event.scheduled_run_times[-1]
            log.warning("%s: fire %s skipped: the previous run is still going", name, _fmt(fire))
            store.record(name, "skipped_overlap", fire_time=fire,
                         note="previous run (or its retries) still going in this scheduler")
        elif event.code == EVENT_JOB_MISSED:
            fire = event.scheduled_run_time
            late = (_utcnow() - fire).total_seconds()
            log.warning("%s: fire %s missed by %.0f s (> misfire grace %d s): skipped", name,
                        _fmt(fire), late, opts.misfire_grace_s)
            store.record(name, "missed", fire_time=fire,
                         note=f"{late:.0f} s late, misfire grace {opts.misfire_grace_s} s")

    sched.add_listener(on_event, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)

    # Jobs already stored keep their next fire time (so fires missed while down are caught up)
    # unless the schedule changed.
    jobstore.start(sched, "default")
    for path, cfg in items:
        jid = job_id(cfg.name)
        old = jobstore.lookup_job(jid)
        if not cfg.schedule:
            if old is not None:
                jobstore.remove_job(jid)
                log.info("%s: no schedule in %s any more: job removed", cfg.name, path)
            continue
        trigger = build_trigger(cfg.schedule, opts.tz)
        kwargs = dict(pipeline=cfg.name, path=str(path.resolve()),
                      command=_pipeline_command(path.resolve(), opts.command, cfg.name),
                      retries=opts.retries, backoff_s=opts.backoff_s, no_retry=opts.no_retry,
                      timeout_s=opts.timeout_s, schedule=cfg.schedule, tz=opts.tz)
        extra: dict[str, Any] = {}
        if opts.run_now:
            extra["next_run_time"] = _utcnow()
        elif old is not None and repr(old.trigger) == repr(trigger) and old.next_run_time:
            extra["next_run_time"] = old.next_run_time
        sched.add_job("pipelines.schedule:run_scheduled", trigger, id=jid, name=cfg.name,
                      kwargs=kwargs, replace_existing=True, **extra)
    jobstore.shutdown()  # the scheduler starts it again

    received: list[int] = []

    def on_signal(signum, _frame) -> None:
        received.append(signum)
        if len(received) > 1:
            rt.killing.set()  # second signal: no grace
        rt.stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    sched.start()
    for _, cfg in scheduled:
        job = sched.get_job(job_id(cfg.name))
        log.info("scheduled %s: %r (%s), next fire %s", cfg.name, cfg.schedule, opts.tz,
                 _fmt(job.next_run_time if job else None))
    log.info("scheduler running (store %s); SIGTERM or Ctrl-C stops it",
             store.engine.url.render_as_string(hide_password=True))

    while not rt.stopping.wait(1.0):
        pass

    log.info("%s: stopping (no new fires; running children get SIGTERM, SIGKILL after %g s)",
             signal.Signals(received[0]).name if received else "stop", opts.shutdown_grace_s)
    sched.pause()  # no new fires from here on
    with rt.lock:
        children = list(rt.children.values())
    threads = [threading.Thread(target=_stop_child, args=(p, opts.shutdown_grace_s, rt),
                                daemon=True) for p in children]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with rt.idle:  # the job threads record their outcome, then return
        rt.idle.wait_for(lambda: rt.active == 0, timeout=30)
    sched.shutdown(wait=False)
    store.engine.dispose()
    log.info("scheduler stopped")
    return 0


# --------------------------------------------------------------------------- --list

def list_jobs(items: list[tuple[Path, Any]], db_url: str, last: int) -> str:
    from apscheduler.schedulers.background import BackgroundScheduler

    store = Store(db_url)
    wanted = [c.name for _, c in items] or None
    jobs: dict[str, Any] = {}
    if store.has_table(JOBS_TABLE):
        js = _scoped_jobstore(store.engine, [job_id(n) for n in wanted] if wanted else None)
        js.start(BackgroundScheduler(timezone=timezone.utc), "default")
        for job in js.get_all_jobs():
            jobs[job.kwargs.get("pipeline") or job.name] = job
    names = wanted or sorted(set(jobs) | set(store.pipelines_with_runs()))
    lines = [f"scheduler store: {store.engine.url.render_as_string(hide_password=True)}"]
    if not names:
        lines.append("no scheduled pipelines")
    for name in names:
        job = jobs.get(name)
        if job is None:
            lines.append(f"{name}: not scheduled (no job in the store)")
        else:
            sched = job.kwargs.get("schedule", str(job.trigger))
            lines.append(f"{name}: schedule {sched!r} ({job.kwargs.get('tz', 'UTC')}), "
                         f"next fire {_fmt(job.next_run_time)}")
        runs = store.last_runs(name, last)[::-1]  # oldest first
        if not runs:
            lines.append("    no recorded fires")
        for r in runs:
            secs = ""
            if r["started_at"] and r["ended_at"]:
                secs = f" {(r['ended_at'] - r['started_at']).total_seconds():.1f} s"
            code = "" if r["exit_code"] is None else f" exit {r['exit_code']}"
            attempt = "" if r["attempt"] is None else f" attempt {r['attempt']}"
            note = f"  ({r['note']})" if r["note"] else ""
            lines.append(f"    fire {_fmt(r['fire_time'])}  {r['outcome']:<15}{attempt}{code}"
                         f"{secs}{note}")
    store.engine.dispose()
    return "\n".join(lines)


# --------------------------------------------------------------------------- --export k8s

def _k8s_name(pipeline: str) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", f"maas-{pipeline}".lower()).strip("-")
    return name[:52].rstrip("-")  # CronJob names: DNS label, at most 52 characters


def k8s_cronjob(path: Path, cfg: Any, *, image: str, tz: str, retries: int,
                misfire_grace_s: int, no_retry: list[int], timeout_s: float | None,
                tracking_uri: str | None) -> dict[str, Any]:
    if not cfg.schedule:
        raise ScheduleError(f"{path}: pipeline {cfg.name!r} has no schedule to export")
    fields = normalize_cron(cfg.schedule)
    if len(fields) == 6:
        raise ScheduleError(f"{path}: schedule {cfg.schedule!r} has a seconds field; Kubernetes "
                            "CronJobs take 5-field cron (minute hour day month weekday)")
    build_trigger(cfg.schedule, tz)  # same validation as the scheduler
    container = {
        "name": "maas",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["maas", "run", path.as_posix(), "--trigger", "schedule"],
        "env": [{"name": "MLFLOW_TRACKING_URI", "value": tracking_uri},
                {"name": "MAAS_SCHEDULE_PIPELINE", "value": cfg.name}],
    }
    job_spec: dict[str, Any] = {
        "backoffLimit": retries,
        # like the scheduler: config/usage (2) and data-validation (3) failures are not retried,
        # and pod disruptions (preemption, node drain) don't count as failures
        "podFailurePolicy": {"rules": [
            {"action": "FailJob",
             "onExitCodes": {"containerName": "maas", "operator": "In",
                             "values": sorted(no_retry)}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]},
        "template": {
            "metadata": {"labels": {"app.kubernetes.io/name": "maas",
                                    "maas.pipeline": _k8s_name(cfg.name)}},
            "spec": {"restartPolicy": "Never", "containers": [container]},
        },
    }
    if not no_retry:
        job_spec["podFailurePolicy"]["rules"].pop(0)
    if timeout_s:
        job_spec["activeDeadlineSeconds"] = int(timeout_s)
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": _k8s_name(cfg.name),
                     "labels": {"app.kubernetes.io/name": "maas",
                                "app.kubernetes.io/component": "pipeline-schedule"},
                     "annotations": {"maas/pipeline": cfg.name, "maas/source": str(path)}},
        "spec": {
            "schedule": " ".join(fields),
            "timeZone": "Etc/UTC" if tz.upper() == "UTC" else tz,
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": int(misfire_grace_s),
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {"spec": job_spec},
        },
    }


def export_k8s(items: list[tuple[Path, Any]], *, image: str, tz: str, retries: int,
               misfire_grace_s: int, no_retry: list[int], timeout_s: float | None) -> str:
    import yaml

    docs = []
    for path, cfg in items:
        uri = tracking_uri_of(cfg)
        if store_url(uri) is None or uri.startswith("sqlite"):
            log.warning("%s: tracking store %s is local to this machine; a pod cannot share it. "
                        "Set tracking_uri (or MLFLOW_TRACKING_URI) to a PostgreSQL URL or an "
                        "MLflow server, or edit the manifest's env.", cfg.name, uri)
        docs.append(k8s_cronjob(path, cfg, image=image, tz=tz, retries=retries,
                                misfire_grace_s=misfire_grace_s, no_retry=no_retry,
                                timeout_s=timeout_s, tracking_uri=uri))
    header = ("# Generated by `maas schedule --export k8s`: one CronJob per scheduled pipeline.\n"
              "# The image must contain the project and the pipeline file at the path in "
              "`command` (relative to the image's working directory).\n")
    return header + yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False)


# --------------------------------------------------------------------------- the command

def _codes(text: str) -> list[int]:
    try:
        return sorted({int(x) for x in text.replace(" ", "").split(",") if x})
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: expected comma-separated exit codes, e.g. 2,3") from None


def _load(pipelines: tuple[Path, ...]) -> list[tuple[Path, Any]]:
    from pipelines.config import PipelineConfig

    items, seen = [], {}
    for p in pipelines:
        cfg = PipelineConfig.load(p)
        if cfg.name in seen:
            raise ScheduleError(f"{p} and {seen[cfg.name]} are both pipeline {cfg.name!r}; "
                                "one job per pipeline name")
        seen[cfg.name] = p
        if cfg.schedule:
            try:
                build_trigger(cfg.schedule)  # fail at start, naming the file
            except ScheduleError as exc:
                raise ScheduleError(f"{p}: {exc}") from None
        items.append((p, cfg))
    return items


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("pipelines", nargs=-1, type=click.Path(path_type=Path))
@click.option("--list", "list_", is_flag=True,
              help="Print next fire times and last outcomes; don't start the scheduler.")
@click.option("--last", default=5, show_default=True, metavar="N",
              help="--list: how many recent fires to show per pipeline.")
@click.option("--export", type=click.Choice(["k8s"]),
              help="Write Kubernetes CronJob manifests instead of scheduling.")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="--export: the file to write (default: stdout).")
@click.option("--image", default=DEFAULT_IMAGE, show_default=True,
              help="--export: the container image with maas installed.")
@click.option("--db", metavar="URL",
              help="Database for the scheduler's tables (default: the pipelines' MLflow "
                   "tracking database).")
@click.option("--timezone", "tz", default="UTC", show_default=True,
              help="Time zone the cron schedules are read in.")
@click.option("--retries", default=2, show_default=True, type=click.IntRange(0),
              help="Retries of a failed run (not for exit codes in --no-retry-exit-codes).")
@click.option("--retry-backoff", "backoff_s", default=30.0, show_default=True,
              type=click.FloatRange(0), help="Seconds before the first retry; doubles each time.")
@click.option("--no-retry-exit-codes", "no_retry", default=NO_RETRY_DEFAULT, show_default=True,
              help="Exit codes that are never retried (2 config/usage, 3 data validation).")
@click.option("--misfire-grace", "misfire_grace_s", default=3600, show_default=True,
              type=click.IntRange(1),
              help="A fire missed while down runs once at start-up if at most this many "
                   "seconds late; else it is skipped.")
@click.option("--shutdown-grace", "shutdown_grace_s", default=30.0, show_default=True,
              type=click.FloatRange(0),
              help="On SIGTERM/SIGINT: seconds between SIGTERM and SIGKILL for a running child.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True),
              help="Stop an attempt running longer than this many seconds (counts as a failure).")
@click.option("--run-now", is_flag=True,
              help="Fire every pipeline once at start-up, then follow the schedule.")
@click.option("--command", "command", hidden=True,
              help="Testing: run this instead of `maas run PIPELINE --trigger schedule` "
                   "({pipeline}, {name}, {python} are substituted).")
def schedule_command(pipelines: tuple[Path, ...], list_: bool, last: int, export: str | None,
                     output: Path | None, image: str, db: str | None, tz: str, retries: int,
                     backoff_s: float, no_retry: str, misfire_grace_s: int,
                     shutdown_grace_s: float, timeout_s: float | None, run_now: bool,
                     command: str | None) -> None:
    """Run pipelines on the cron schedules in their files (one long-lived process).

    \b
    maas schedule A.yaml [B.yaml ...]       run until SIGTERM/Ctrl-C
    maas schedule --list [A.yaml ...]       next fire times and recent outcomes
    maas schedule --export k8s A.yaml -o cronjob.yaml
    Each fire is `maas run PIPELINE --trigger schedule` in a child process. Never two runs
    of one pipeline at once; failed runs are retried with exponential backoff (exit codes
    2 and 3 are not); missed fires are coalesced into one catch-up run within the misfire
    grace. Jobs and outcomes live in the MLflow tracking database (tables
    maas_scheduler_jobs, maas_schedule_runs). See docs/scheduling.md.
    """
    from pipelines.config import ConfigError

    try:
        codes = _codes(no_retry)
        build_trigger("* * * * *", tz)  # the time zone is known
        items = _load(pipelines)
        if export:
            if not items:
                raise ScheduleError("--export k8s needs at least one PIPELINE file")
            text = export_k8s(items, image=image, tz=tz, retries=retries,
                              misfire_grace_s=misfire_grace_s, no_retry=codes,
                              timeout_s=timeout_s)
            if output:
                output.write_text(text)
                click.echo(f"wrote {len(items)} CronJob(s) to {output}", err=True)
            else:
                click.echo(text, nl=False)
            return
        db_url = resolve_db([c for _, c in items], db)
        if list_:
            click.echo(list_jobs(items, db_url, last))
            return
        if not items:
            raise ScheduleError("give at least one PIPELINE file to schedule")
        if not any(c.schedule for _, c in items):
            raise ScheduleError("none of the pipelines has a `schedule` (a cron string)")
        for p, c in items:
            if not c.schedule:
                log.warning("%s (%s) has no schedule: not scheduled", c.name, p)
        opts = _Options(retries=retries, backoff_s=backoff_s, no_retry=codes,
                        misfire_grace_s=misfire_grace_s, shutdown_grace_s=shutdown_grace_s,
                        timeout_s=timeout_s, tz=tz, command=command, run_now=run_now)
        sys.exit(serve(items, db_url, opts))
    except (ConfigError, ScheduleError, click.BadParameter) as exc:
        msg = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
        click.echo(f"error: {msg}", err=True)
        sys.exit(EXIT_CONFIG)
