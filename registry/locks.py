"""Database locks by URL and key for the registry and the pipelines that drive it.

A lock named by a string key lives with a database: on PostgreSQL a session advisory lock (on a
connection of its own, id :func:`lock_id` of the key), for a SQLite file an ``flock`` on
``<db file name>.<16 hex digits of sha256(real db path, key)>.lock`` in :func:`lock_dir` (a
per-user folder in the system's temporary directory, or ``$MAAS_LOCK_DIR``: never beside the
database, so a run leaves the user's folder as it found it; the URL's query string, which may
carry credentials, plays no part), or on a file named after the key in a folder the caller
names. Other URLs (an MLflow server, a file store) get no lock unless the caller names a folder.
A dead holder releases the lock with its file descriptor or connection: nothing to clean up.
Processes of different OS users sharing one SQLite file lock in different folders (use
PostgreSQL, or a shared ``$MAAS_LOCK_DIR``). The PostgreSQL lock ids are those the three former
copies used (same key, same id); SQLite lock files moved out of the database's folder, so stop
processes of older versions before upgrading.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)


class Busy(RuntimeError):
    """Another live process holds the lock (``key``; ``holder`` says who, where known)."""

    def __init__(self, key: str, holder: str) -> None:
        super().__init__(f"lock {key!r} is held by {holder}")
        self.key, self.holder = key, holder


def lock_id(key: str) -> int:
    """The PostgreSQL advisory lock id of ``key``: the first 8 bytes of its sha256, signed."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)


def _parse(url: str):
    from sqlalchemy.engine import make_url

    try:
        return make_url(url)
    except Exception:  # noqa: BLE001 - not an SQLAlchemy URL (http://, a path): no database
        return None


def _is_postgres(url: str) -> bool:
    parsed = _parse(url)
    return parsed is not None and parsed.get_backend_name() == "postgresql"


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (None for another URL or an in-memory database)."""
    parsed = _parse(url)
    if parsed is None or parsed.get_backend_name() != "sqlite":
        return None
    db = parsed.database  # without the query string
    return Path(db) if db and db != ":memory:" and not db.startswith("file:") else None


def supported(url: str) -> bool:
    """Whether ``url`` is a database :func:`db_lock` really locks (PostgreSQL, a SQLite file)."""
    return _is_postgres(url) or sqlite_file(url) is not None


def lock_dir() -> Path:
    """Where SQLite databases' lock files live: ``$MAAS_LOCK_DIR``, else ``maas-locks-<uid>`` in
    the system's temporary directory."""
    env = os.environ.get("MAAS_LOCK_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"maas-locks-{os.getuid()}"


def lock_file(url: str, key: str, folder: Path | None = None) -> Path | None:
    """The lock file of ``key``: in ``folder`` if given, else in :func:`lock_dir`, named after
    the SQLite database of ``url`` (its real path) and the key (None: PostgreSQL, or neither a
    SQLite file nor a folder)."""
    if _is_postgres(url):
        return None
    if folder is not None:
        return folder / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.lock"
    db = sqlite_file(url)
    if db is None:
        return None
    digest = hashlib.sha256(f"{os.path.realpath(db)}\0{key}".encode()).hexdigest()[:16]
    return lock_dir() / f"{db.name}.{digest}.lock"


class DbLock:
    """The lock of ``key`` in the database of ``url``, taken with :meth:`acquire`.

    ``folder``: where the lock file goes unless ``url`` is PostgreSQL (default: beside a SQLite
    database; other URLs then get no lock, :meth:`acquire` always succeeds). The file lock's
    descriptor can be handed to a child process (:meth:`inheritable_fds`): the lock then lives
    until both ends have closed it."""

    def __init__(self, url: str, key: str, *, folder: Path | None = None) -> None:
        self.key = key
        self.url = url if _is_postgres(url) else None
        self.path = lock_file(url, key, folder)
        self._fd: int | None = None
        self._conn = None

    def acquire(self, *, wait: bool) -> bool:
        """Take the lock; with ``wait=False`` give up at once (False) when another holds it."""
        if self.url is not None:
            return self._acquire_pg(wait)
        if self.path is not None:
            return self._acquire_file(wait)
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the flock goes when the last descriptor (ours, a child's) closes
            self._fd = None
        if self._conn is not None:
            import sqlalchemy as sa

            try:
                self._conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"),
                                   {"k": lock_id(self.key)})
                self._conn.commit()
                self._conn.close()
            except Exception:  # noqa: BLE001 - any failure: drop the session, and its lock
                log.warning("unlocking %r failed; closing its session instead", self.key)
                self._conn.invalidate()
            self._conn = None

    def holder(self) -> str:
        """Who holds the lock, as far as it can tell (``host pid N since T``)."""
        if self.url is not None:
            return _pg_holder(self.url, lock_id(self.key))
        try:
            return (self.path.read_text().strip() if self.path else "") or "unknown"
        except OSError:
            return "unknown"

    def inheritable_fds(self) -> tuple[int, ...]:
        """Descriptors a child process must inherit to keep holding the lock (a file lock's)."""
        return (self._fd,) if self._fd is not None else ()

    def _acquire_file(self, wait: bool) -> bool:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{_me()}\n".encode())
        self._fd = fd
        return True

    def _acquire_pg(self, wait: bool) -> bool:
        import sqlalchemy as sa

        conn = _engine(self.url).connect()
        try:
            k, got = lock_id(self.key), True
            # who holds it, for :meth:`holder` in other processes
            conn.execute(sa.text("SELECT set_config('application_name', :n, false)"),
                         {"n": f"maas {_me()}"[:63]})
            if wait:
                conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": k})
            else:
                got = conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": k}).scalar()
            conn.commit()  # the lock is the session's: don't sit idle in a transaction
        except BaseException:
            conn.close()
            raise
        if not got:
            conn.close()
            return False
        self._conn = conn
        return True


@contextlib.contextmanager
def db_lock(url: str, key: str, *, wait: bool) -> Iterator[None]:
    """Hold the lock of ``key`` in the database of ``url`` while the block runs. ``wait=False``
    raises :class:`Busy` (naming the holder) instead of waiting. No lock on other URLs."""
    lock = DbLock(url, key)
    if not lock.acquire(wait=wait):
        raise Busy(key, lock.holder())
    try:
        yield
    finally:
        lock.release()


def _me() -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
    return f"{socket.gethostname()} pid {os.getpid()} since {since}"


@lru_cache(maxsize=8)
def _engine(url: str):
    import sqlalchemy as sa

    # NullPool: a lock's connection is really closed on release (a pooled one would keep an
    # advisory lock that failed to unlock) and never shared with a forked child
    return sa.create_engine(url, poolclass=sa.pool.NullPool)


def _pg_holder(url: str, k: int) -> str:
    """The application name of the session holding advisory lock ``k`` (a bigint lock is
    stored as classid = high 32 bits, objid = low 32 bits, objsubid = 1)."""
    import sqlalchemy as sa

    query = sa.text(
        "SELECT a.application_name, a.pid FROM pg_locks l JOIN pg_stat_activity a "
        "ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
        "AND l.classid = CAST(:hi AS oid) AND l.objid = CAST(:lo AS oid) AND l.database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database())")
    u = k & 0xFFFFFFFFFFFFFFFF
    try:
        with _engine(url).connect() as conn:
            row = conn.execute(query, {"hi": u >> 32, "lo": u & 0xFFFFFFFF}).first()
    except Exception:  # noqa: BLE001 - the message only loses its detail
        row = None
    if row is None:
        return "another session (PostgreSQL advisory lock)"
    name = (row[0] or "").removeprefix("maas ")
    return name or f"PostgreSQL backend pid {row[1]}"
