"""One run per pipeline at a time: the per-pipeline lock a scheduler fire holds (PostgreSQL
advisory lock, else an ``flock`` file beside the SQLite database) and the same lock for a run
started by hand (:func:`manual_run_lock`)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from pipelines.scheduling.records import make_engine, store_url, tracking_uri_of


class PipelineBusy(RuntimeError):
    """Another run of the pipeline (scheduled or manual) holds its lock."""


def pipeline_lock(engine, pipeline: str) -> _PgLock | _FileLock:
    """The (not yet acquired) lock of ``pipeline`` in the database of ``engine``."""
    if engine.dialect.name == "postgresql":
        return _PgLock(engine, pipeline)
    db = engine.url.database if engine.dialect.name == "sqlite" else None
    folder = Path(db).resolve().parent if db and db != ":memory:" else Path.cwd()
    return _FileLock(folder / ".maas-locks" / f"schedule-{_safe(pipeline)}.lock")


@contextlib.contextmanager
def manual_run_lock(cfg: Any, *, trigger: str = "manual"):
    """Hold the per-pipeline lock the scheduler takes, for a run started by hand: a manual run
    and a scheduled run of the same pipeline never overlap. A run with ``--trigger schedule``
    takes none: its scheduler keeps runs apart (``maas schedule`` holds this lock for the whole
    fire; an exported CronJob has ``concurrencyPolicy: Forbid``). A tracking store that is not a
    database (an MLflow server) has no lock to take. Raises :class:`PipelineBusy`."""
    url = store_url(tracking_uri_of(cfg))
    if trigger == "schedule" or url is None:
        yield
        return
    lock = pipeline_lock(make_engine(url), cfg.name)
    if not lock.acquire():
        raise PipelineBusy(f"pipeline {cfg.name!r} is already running ({lock.holder()}): a run "
                           "started by hand never overlaps another run of the same pipeline, "
                           "scheduled or manual; try again when it has finished")
    try:
        yield
    finally:
        lock.release()


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
        since = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
        os.write(fd, f"{socket.gethostname()} pid {os.getpid()} since {since}\n".encode())
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
        except Exception:  # noqa: BLE001 - any failure: drop the session, which drops the lock
            self.conn.invalidate()  # closing the session drops the lock too
        self.conn = None
