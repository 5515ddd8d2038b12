"""Alias moves: promote a version to ``champion`` (one promotion per model at a time, with the
evidence and an attempt record on the version), roll ``champion`` back, set an alias with retry.

Design choice for rejected challengers: ``promote(name, version, decision)`` with
``decision.promote`` False records the decision tags and an attempt record on the version and does
NOT move the alias. So the pipeline always calls ``promote`` with the gate's decision, and an
operator calls ``promote(name, version)`` without one to force a promotion.

Tag layout: :mod:`registry.tags`.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from registry import locks
from registry.gate import Decision
from registry.queries import champion
from registry.tags import (
    CHAMPION,
    TAG_ATTEMPT_PREFIX,
    TAG_PREVIOUS_CHAMPION,
    TAG_PROMOTED_AT,
    TAG_PROMOTED_BY,
    TAG_RESTORED_AT,
    TAG_ROLLBACK_PREFIX,
    TAG_ROLLED_BACK_AT,
    TAG_ROLLED_BACK_TO,
    TAG_SUPERSEDED_BY,
    as_json,
    attempt_key,
    iso,
    now_iso,
)
from registry.versions import (
    RegistryError,
    alias_version,
    get_model,
    get_version,
    restore_tags,
    set_tags,
    try_set_tag,
)

logger = logging.getLogger(__name__)

#: seconds a promotion through a tracking server waits before reading the alias back
SETTLE_S = 1.0


def promote(
    name: str,
    version: str | int,
    decision: Decision | None = None,
    *,
    actor: str = "manual",
) -> str | None:
    """Make ``version`` the ``champion`` of ``name`` and record the evidence on it.

    * ``decision`` None (forced/manual) or ``decision.promote`` True: the alias moves; the version
      gets ``maas.promoted_at``, ``maas.promoted_by`` (= ``actor``), ``maas.previous_champion``
      and the decision's ``maas.decision.*`` tags.
    * ``decision.promote`` False: only the decision tags are recorded; the alias does not move.
    * ``version`` already champion: nothing changes (no error).

    Every call appends a JSON attempt record ``maas.promotion_attempt.<ts>-<pid>-<rand>`` on the
    version (outcome ``promoted`` / ``superseded`` / ``rejected`` / ``noop`` / ``failed``), so
    concurrent calls leave a trace each. After moving the alias it is read back: the return value
    is the actual champion version (another concurrent call may have won; then the outcome is
    ``superseded``). Returns the champion version after the call (None if there is none).
    """
    client = mlflow.MlflowClient()
    version = str(version)
    mv = get_version(client, name, version)
    if mv.status != "READY":
        raise RegistryError(f"model {name!r} version {version} is {mv.status}, not READY")
    started = datetime.now(timezone.utc)
    key = attempt_key(started)
    record: dict[str, Any] = {"at": iso(started), "actor": actor,
                              "decision": None if decision is None else decision.promote}
    # serialise promotions of one model (a lock in the SQLite / PostgreSQL store); a tracking
    # server (http) has none: the alias is then read back after SETTLE_S and a lost race is
    # recorded as ``superseded``
    with locks.db_lock(mlflow.get_tracking_uri(), f"maas.promote:{name}", wait=True):
        return _promote_locked(client, name, version, mv, decision, actor, started, key, record)


def _promote_locked(client, name, version, mv, decision, actor, started, key, record):
    current = alias_version(client, name, CHAMPION)

    if decision is not None and not decision.promote:
        set_tags(client, name, version, decision.to_tags())
        set_tags(client, name, version, {key: as_json(
            {**record, "outcome": "rejected", "champion": current, "reason": decision.reason})})
        logger.info("%s version %s not promoted: %s", name, version, decision.reason)
        return current

    if current == version:
        client.set_model_version_tag(name, version, key, as_json(
            {**record, "outcome": "noop", "champion": current}))
        logger.info("%s version %s is already %s", name, version, CHAMPION)
        return current

    new_tags = {TAG_PROMOTED_AT: iso(started), TAG_PROMOTED_BY: actor,
                TAG_PREVIOUS_CHAMPION: current or ""}
    if decision is not None:
        new_tags.update(decision.to_tags())
    before = {k: mv.tags.get(k) for k in new_tags}
    try:
        # Tags first: a champion must always carry its previous_champion, or rollback breaks.
        set_tags(client, name, version, new_tags)
        client.set_registered_model_alias(name, CHAMPION, version)
    except BaseException as exc:
        restore_tags(client, name, version, before)
        try_set_tag(client, name, version, key, as_json(
            {**record, "outcome": "failed", "champion": current, "error": repr(exc)[:500]}))
        raise

    actual = alias_version(client, name, CHAMPION)
    if actual == version and not locks.supported(mlflow.get_tracking_uri()):
        # a tracking server offers no lock or compare-and-set on aliases: give a racing call
        # time to land its write, then look again (the last writer wins the alias)
        time.sleep(SETTLE_S)
        actual = alias_version(client, name, CHAMPION)
    outcome = "promoted" if actual == version else "superseded"
    client.set_model_version_tag(name, version, key, as_json(
        {**record, "outcome": outcome, "champion": actual, "previous": current,
         "reason": None if decision is None else decision.reason}))
    if outcome == "promoted":
        logger.info("%s: %s %s -> %s (by %s)", name, CHAMPION, current, version, actor)
    else:
        try_set_tag(client, name, version, TAG_SUPERSEDED_BY, str(actual))
        logger.warning("%s: promoted version %s but %s is now %s (concurrent promotion)",
                       name, version, CHAMPION, actual)
    return actual


def rollback(name: str, *, actor: str = "manual") -> str:
    """Move ``champion`` back to the current champion's ``maas.previous_champion``.

    Repeated calls walk back the chain (v3 -> v2 -> v1). The rolled-back version gets
    ``maas.rolled_back_at`` / ``maas.rolled_back_to``; the restored one ``maas.restored_at`` and
    a ``maas.rollback.*`` record naming ``actor``.
    Raises :class:`RegistryError` (a ValueError) if there is no champion or no previous one.
    Returns the new champion version.
    """
    client = mlflow.MlflowClient()
    get_model(client, name)
    current = champion(name)
    if current is None:
        raise RegistryError(f"model {name!r} has no {CHAMPION}; nothing to roll back")
    cur_v = str(current.version)
    previous = current.tags.get(TAG_PREVIOUS_CHAMPION, "")
    if not previous:
        raise RegistryError(f"model {name!r} {CHAMPION} version {cur_v} has no previous "
                            f"{CHAMPION} recorded; nothing to roll back to")
    try:
        get_version(client, name, previous)
    except RegistryError as exc:
        raise RegistryError(f"cannot roll back {name!r} from version {cur_v}: previous "
                            f"{CHAMPION} version {previous} no longer exists") from exc
    now = now_iso()
    client.set_registered_model_alias(name, CHAMPION, previous)
    set_tags(client, name, cur_v, {TAG_ROLLED_BACK_AT: now, TAG_ROLLED_BACK_TO: previous})
    client.set_model_version_tag(name, previous, TAG_RESTORED_AT, now)
    try_set_tag(client, name, previous,
                attempt_key(datetime.now(timezone.utc)).replace(TAG_ATTEMPT_PREFIX,
                                                                TAG_ROLLBACK_PREFIX),
                as_json({"at": now, "actor": actor, "from": cur_v, "to": previous}))
    logger.warning("%s: rolled back %s from version %s to %s", name, CHAMPION, cur_v, previous)
    return previous


def set_alias(client, name: str, alias: str, version: str, attempts: int = 3) -> None:
    """``set_registered_model_alias``, retried: the SQL store upserts the alias as
    read-then-insert, so two registrations racing to create an alias that does not exist yet
    make one of them fail with a unique-key violation (seen with 8 parallel registrations
    against a PostgreSQL-backed server); on retry the alias exists and is updated. Last writer
    wins, as for any alias move."""
    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException as exc:
            if attempt == attempts - 1 or "unique" not in str(exc).lower():
                raise
