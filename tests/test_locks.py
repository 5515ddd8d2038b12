"""registry.locks: one contract, run against a SQLite file and a PostgreSQL database, with real
processes holding, waiting for and dying with the lock."""

from __future__ import annotations

import hashlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from registry.locks import Busy, DbLock, db_lock, lock_dir, lock_file, lock_id, supported

ROOT = Path(__file__).resolve().parents[1]

# a process that takes the lock, says "held" (or "busy"), and holds it until a line on stdin
_CHILD = """
import sys
from registry.locks import DbLock
lock = DbLock(sys.argv[1], sys.argv[2])
print("held" if lock.acquire(wait=sys.argv[3] == "wait") else "busy", flush=True)
sys.stdin.readline()
lock.release()
print("released", flush=True)
"""


class Child:
    """A lock-taking subprocess; its stdout lines arrive on a queue (reads never hang)."""

    def __init__(self, cwd: Path, url: str, key: str, *, wait: bool = False) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, url, key, "wait" if wait else "nowait"], cwd=cwd,
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def line(self, timeout: float = 60) -> str:
        return self.lines.get(timeout=timeout)

    def release(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        assert self.line() == "released"
        self.proc.wait(timeout=30)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("pg_url")  # a fresh database: no other test's locks


@pytest.fixture
def spawn(tmp_path):
    children: list[Child] = []

    def start(url: str, key: str, *, wait: bool = False) -> Child:
        children.append(Child(tmp_path, url, key, wait=wait))
        return children[-1]

    yield start
    for child in children:
        if child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait(timeout=30)


def test_a_held_key_is_busy_for_another_process(url, spawn):
    with db_lock(url, "k", wait=False):
        assert spawn(url, "k").line() == "busy"


def test_busy_names_the_holder(url, spawn):
    holder = spawn(url, "k")
    assert holder.line() == "held"
    held_by = rf"lock 'k' is held by .*pid {holder.proc.pid} since"
    with pytest.raises(Busy, match=held_by) as exc, db_lock(url, "k", wait=False):
        pass
    assert exc.value.key == "k"


def test_a_waiter_blocks_until_the_holder_releases(url, spawn):
    lock = DbLock(url, "k")
    assert lock.acquire(wait=False)
    waiter = spawn(url, "k", wait=True)
    with pytest.raises(queue.Empty):
        waiter.line(timeout=2)  # still waiting
    lock.release()
    assert waiter.line(timeout=30) == "held"
    assert not DbLock(url, "k").acquire(wait=False)
    waiter.release()
    with db_lock(url, "k", wait=False):
        pass


def test_different_keys_do_not_block_each_other(url, spawn):
    assert spawn(url, "a").line() == "held"
    with db_lock(url, "b", wait=False), db_lock(url, "c", wait=True):
        assert spawn(url, "d").line() == "held"
    with pytest.raises(Busy), db_lock(url, "a", wait=False):
        pass


def test_reacquire_after_release(url, spawn):
    for _ in range(2):
        with db_lock(url, "k", wait=False):
            pass
    child = spawn(url, "k")
    assert child.line() == "held"
    child.release()
    with db_lock(url, "k", wait=False):
        pass


def test_a_killed_holder_releases_the_lock_promptly(url, spawn):
    holder = spawn(url, "k")
    assert holder.line() == "held"
    assert not DbLock(url, "k").acquire(wait=False)
    holder.proc.send_signal(signal.SIGKILL)
    holder.proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while True:
        lock = DbLock(url, "k")
        if lock.acquire(wait=False):
            lock.release()
            break
        assert time.monotonic() < deadline, "the dead holder's lock was not released in 10 s"
        time.sleep(0.1)


def test_a_query_string_names_the_same_lock(url, spawn, tmp_path):
    query = "?timeout=30" if url.startswith("sqlite") else "?connect_timeout=10"
    assert spawn(url + query, "k").line() == "held"
    with pytest.raises(Busy), db_lock(url, "k", wait=False):
        pass
    if url.startswith("sqlite"):  # the lock file is in lock_dir(), no query in its name
        assert lock_file(url + "?mode=rw&password=secret", "k") == lock_file(url, "k")
        assert lock_file(url, "k").parent == lock_dir() != tmp_path
        assert "?" not in str(lock_file(url + query, "k"))


def test_an_inherited_descriptor_keeps_a_file_lock(tmp_path, spawn):
    """The scheduler hands its lock file to `maas run`: the lock lives while the child does."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    lock = DbLock(url, "pipeline")
    assert lock.acquire(wait=False) and len(lock.inheritable_fds()) == 1
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             pass_fds=lock.inheritable_fds())
    try:
        lock.release()
        assert lock.inheritable_fds() == ()
        assert spawn(url, "pipeline").line() == "busy"
    finally:
        child.kill()
        child.wait(timeout=30)
    assert spawn(url, "pipeline").line() == "held"


def test_a_named_folder_holds_the_lock_file_instead(tmp_path):
    """Beside each SQLite file, two databases lock apart; a shared folder locks them together
    (the scheduler's per-pipeline lock, for stores that share a folder)."""
    a, b = (f"sqlite:///{tmp_path / name}" for name in ("a.db", "b.db"))
    with db_lock(a, "k", wait=False), db_lock(b, "k", wait=False):
        pass
    first = DbLock(a, "k", folder=tmp_path / "locks")
    assert first.acquire(wait=False)
    try:
        assert first.path.parent == tmp_path / "locks"
        assert not DbLock(b, "k", folder=tmp_path / "locks").acquire(wait=False)
    finally:
        first.release()


def test_sqlite_locks_leave_the_database_folder_as_it_was(tmp_path, monkeypatch):
    """Lock files live in lock_dir() (here $MAAS_LOCK_DIR), never beside the database; two
    databases of the same name in different folders lock apart."""
    monkeypatch.setenv("MAAS_LOCK_DIR", str(tmp_path / "locks"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = (f"sqlite:///{tmp_path / d / 'mlflow.db'}" for d in ("a", "b"))
    with db_lock(a, "maas-budget:study", wait=False), db_lock(b, "maas-budget:study",
                                                               wait=False):
        assert lock_file(a, "maas-budget:study").parent == tmp_path / "locks"
    assert list((tmp_path / "a").iterdir()) == [] and list((tmp_path / "b").iterdir()) == []
    assert len(list((tmp_path / "locks").glob("mlflow.db.*.lock"))) == 2


@pytest.mark.postgres
def test_a_postgres_lock_has_no_descriptor_to_hand_on(pg_url):
    lock = DbLock(pg_url, "pipeline")
    assert lock.acquire(wait=False)
    try:
        assert lock.inheritable_fds() == ()
    finally:
        lock.release()


@pytest.mark.parametrize("other", ["http://127.0.0.1:5000", "file:///tmp/mlruns", "./mlruns",
                                   "sqlite://", "mysql://u@127.0.0.1/db"])
def test_other_stores_get_no_lock_unless_given_a_folder(other, tmp_path):
    assert not supported(other)
    assert lock_file(other, "k") is None
    with db_lock(other, "k", wait=False), db_lock(other, "k", wait=False):
        pass  # nothing to hold
    first, second = (DbLock(other, "k", folder=tmp_path / "locks") for _ in range(2))
    assert first.acquire(wait=False)
    assert not second.acquire(wait=False)
    assert f"pid {os.getpid()}" in second.holder()
    first.release()
    assert second.acquire(wait=False)
    second.release()


def test_lock_ids_and_file_names_are_those_of_the_former_copies():
    """Running systems keep exclusion: the advisory lock id of a key is what tuning, promotion
    and the scheduler computed before (sha256, first 8 bytes, signed), pinned here."""
    assert lock_id("maas.promote:m") == int.from_bytes(
        hashlib.sha256(b"maas.promote:m").digest()[:8], "big", signed=True)
    assert lock_id("maas-budget:study") == -3288498380453291889
    assert supported("sqlite:///mlflow.db") and supported("postgresql+psycopg://u@h/db")
