"""One run per pipeline at a time: the per-pipeline lock a scheduler fire holds and the same lock
for a run started by hand (:func:`manual_run_lock`), both a :class:`registry.locks.DbLock` of
the pipeline's name in the scheduler's database."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any

from pipelines.scheduling.records import store_url, tracking_uri_of
from registry.locks import DbLock, lock_dir, sqlite_file


class PipelineBusy(RuntimeError):
    """Another run of the pipeline (scheduled or manual) holds its lock."""


def pipeline_lock(url: str, pipeline: str) -> DbLock:
    """The (not yet acquired) lock of ``pipeline`` in the database of ``url``: on PostgreSQL an
    advisory lock, else a lock file of the SQLite database's folder (so schedulers and manual
    runs whose stores share a folder keep the pipeline's runs apart) or of the working directory
    (MySQL, ...), kept in :func:`registry.locks.lock_dir`, never in that folder itself. A fire
    hands the file lock's descriptor to its child (``inheritable_fds``): the lock lives as long
    as the run, even if the scheduler is killed."""
    db = sqlite_file(url)
    base = os.path.realpath(db.resolve().parent if db is not None else Path.cwd())
    folder = lock_dir() / f"folder-{hashlib.sha256(base.encode()).hexdigest()[:16]}"
    return DbLock(url, f"maas.schedule:{pipeline}", folder=folder)


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
    lock = pipeline_lock(url, cfg.name)
    if not lock.acquire(wait=False):
        raise PipelineBusy(f"pipeline {cfg.name!r} is already running ({lock.holder()}): a run "
                           "started by hand never overlaps another run of the same pipeline, "
                           "scheduled or manual; try again when it has finished")
    try:
        yield
    finally:
        lock.release()
