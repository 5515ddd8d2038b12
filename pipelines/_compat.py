"""Optuna adapter: the one thing tuning needs that Optuna has no public API for.

Heartbeats with ask-and-tell. Optuna records a running trial's heartbeat only inside
``Study.optimize`` (its private ``optuna.storages._heartbeat`` thread); ``Study.ask`` even warns
that a heartbeat storage is "supposed to be used with Study.optimize". Upstream: optuna/optuna#3293
"Supporting heartbeat in Ask-and-tell" (closed as stale, no public API; the proof of concept
optuna/optuna#3329 was closed unmerged). Our workers must use ask/tell (a trial is claimed under a
budget lock), so this module beats the heart itself through the storage interface
(``BaseStorage``/``RDBStorage`` methods without an underscore: ``get_study_id_from_name``,
``get_trial_id_from_study_id_trial_number``, ``get_heartbeat_interval``, ``record_heartbeat``);
the public ``optuna.storages.fail_stale_trials`` then fails a dead worker's trial and the
storage's ``RetryFailedTrialCallback`` re-queues it. ``tests/test_compat.py`` checks exactly this
against the installed Optuna, so an Optuna release that changes it fails there first.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import optuna

log = logging.getLogger(__name__)

#: the text of the warning ``Study.ask`` gives on a heartbeat storage (we do beat: see above)
_ASK_WARNING = "Heartbeat of storage is supposed to be used with Study.optimize"


def heartbeat_interval(storage: optuna.storages.BaseStorage) -> int | None:
    """The storage's heartbeat interval in seconds, or None (no heartbeat: other backends)."""
    if not isinstance(storage, optuna.storages.RDBStorage):
        return None
    return storage.get_heartbeat_interval()


def ask(study: optuna.Study) -> optuna.Trial:
    """``study.ask()`` without the ask-and-tell heartbeat warning: :func:`heartbeat` beats."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_ASK_WARNING)
        return study.ask()


@contextmanager
def heartbeat(storage: optuna.storages.BaseStorage, study_name: str,
              trial_number: int) -> Iterator[None]:
    """Record trial ``trial_number``'s heartbeat every interval while the block runs (what
    ``Study.optimize`` does for its own trials); nothing without a heartbeat interval."""
    interval = heartbeat_interval(storage)
    if not interval:
        yield
        return
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study_name), trial_number)
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception as exc:  # noqa: BLE001 - a database blip: beat again next time
                log.warning("heartbeat of trial %d not recorded: %s", trial_number, exc)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"maas-heartbeat-{trial_number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
