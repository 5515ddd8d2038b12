"""Model registry operations on MLflow 3.x: register with lineage, gate, promote, roll back.

Everything goes through ``mlflow.MlflowClient()``, which honours ``MLFLOW_TRACKING_URI`` /
``mlflow.set_tracking_uri`` (the registry needs a database backend: SQLite locally, PostgreSQL
when scaled out). Model stages are deprecated in MLflow 3 and never used here; the lifecycle is
two aliases:

* ``challenger`` -- the most recently registered version, awaiting a decision;
* ``champion``   -- the version that is served (``models:/NAME@champion``).

MLflow keeps no history of alias moves, so this module keeps its own on the model versions as
tags (all values are strings):

=====================================  ===========================================================
``maas.run_id``                        the caller's run id; the idempotency key of ``register``
``maas.model_uri``                     the URI that was registered
``maas.registered_at``                 ISO-8601 UTC time of registration
``maas.registration``                  ``pending`` while ``register`` runs, then ``complete``
``maas.registration_id``               random id of the ``register`` call that made the version
``maas.metric.<name>``                 metrics passed by the caller (shown by ``describe``)
``maas.promoted_at`` / ``_by``         when / by whom the version was made champion
``maas.previous_champion``             version that was champion before it ("" if none);
                                       ``rollback`` walks this chain
``maas.rolled_back_at`` / ``_to``      when the version was rolled back and to which version
``maas.restored_at``                   when a rollback made the version champion again
``maas.decision.*``                    the gate's :class:`Decision` (see ``Decision.to_tags``)
``maas.promotion_attempt.<ts>-<pid>-<r>``  one JSON record per ``promote`` call on the version
``maas.rollback.<ts>-<pid>-<r>``       one JSON record per ``rollback`` onto the version (at, actor,
                                       from, to); ``registry.history`` reads these and
                                       the attempts
``maas.superseded_by``                 a concurrent promotion won the alias right after this one
``maas.variant`` / ``maas.variants``    the compression variant to serve and the variant table
                                       (JSON), set by the pipeline at registration
=====================================  ===========================================================

Design choice for rejected challengers: ``promote(name, version, decision)`` with
``decision.promote`` False records the decision tags and an attempt record on the version and does
NOT move the alias. So the pipeline always calls ``promote`` with the gate's decision, and an
operator calls ``promote(name, version)`` without one to force a promotion.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from datetime import datetime, timezone
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from registry import locks
from registry.gate import Decision, should_promote  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"

TAG_PREFIX = "maas."
TAG_RUN_ID = "maas.run_id"
TAG_SUPERSEDED_BY = "maas.superseded_by"
TAG_MODEL_URI = "maas.model_uri"
TAG_REGISTERED_AT = "maas.registered_at"
TAG_REGISTRATION = "maas.registration"
TAG_REGISTRATION_ID = "maas.registration_id"
TAG_METRIC_PREFIX = "maas.metric."
TAG_DECISION_PREFIX = "maas.decision."
TAG_PROMOTED_AT = "maas.promoted_at"
TAG_PROMOTED_BY = "maas.promoted_by"
TAG_PREVIOUS_CHAMPION = "maas.previous_champion"
TAG_ROLLED_BACK_AT = "maas.rolled_back_at"
TAG_ROLLED_BACK_TO = "maas.rolled_back_to"
TAG_RESTORED_AT = "maas.restored_at"
TAG_ATTEMPT_PREFIX = "maas.promotion_attempt."
TAG_ROLLBACK_PREFIX = "maas.rollback."
TAG_VARIANT = "maas.variant"

_AWAIT_READY_S = 300


class RegistryError(ValueError):
    """A registry operation could not be done (unknown model/version, nothing to roll back...)."""


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


def register(
    model_uri: str,
    name: str,
    *,
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
    description: str | None = None,
) -> ModelVersion:
    """Register ``model_uri`` as a new version of ``name`` and make it the ``challenger``.

    ``model_uri`` is anything ``mlflow.register_model`` takes (``runs:/<id>/model``,
    ``models:/<model_id>``, ``models:/NAME/VERSION``). The registered model is created if missing.
    ``tags`` (lineage: data hash, params, ``maas.metric.<name>``...) are stored on the version with
    string values, together with ``maas.run_id`` / ``maas.model_uri`` / ``maas.registered_at``.

    Idempotent per ``run_id``: if a version of ``name`` already carries ``maas.run_id == run_id``,
    that version is returned (and finished if an earlier call died half way); no second version
    is made. Any failure after the version was created deletes it again before re-raising.
    """
    client = mlflow.MlflowClient()
    if run_id:
        existing = _versions_for_run(client, name, run_id)
        if existing:
            mv = existing[0]
            logger.info("model %s version %s already registered for run %s; reusing it",
                        name, mv.version, run_id)
            if mv.tags.get(TAG_REGISTRATION) != "complete":
                _finish_registration(client, mv, description)
            return client.get_model_version(name, str(mv.version))

    all_tags = {str(k): _str(v) for k, v in (tags or {}).items()}
    reg_id = uuid.uuid4().hex
    all_tags.update({
        TAG_MODEL_URI: model_uri,
        TAG_REGISTERED_AT: _now_iso(),
        TAG_REGISTRATION: "pending",
        TAG_REGISTRATION_ID: reg_id,
    })
    if run_id:
        all_tags[TAG_RUN_ID] = run_id

    mv: ModelVersion | None = None
    try:
        # Tags go in with the version in one write, so the idempotency key is never missing.
        mv = mlflow.register_model(model_uri, name, await_registration_for=_AWAIT_READY_S,
                                   tags=all_tags)
        if run_id:
            # Two racing calls for the same run: the lowest version wins, the other undoes itself.
            winner = _versions_for_run(client, name, run_id)[0]
            if str(winner.version) != str(mv.version):
                logger.info("concurrent registration of run %s: keeping version %s",
                            run_id, winner.version)
                _delete_version(client, name, str(mv.version))
                mv = None
                if winner.tags.get(TAG_REGISTRATION) != "complete":
                    _finish_registration(client, winner, description)
                return client.get_model_version(name, str(winner.version))
        _finish_registration(client, mv, description)
    except BaseException:
        _undo_registration(client, name, mv, reg_id)
        raise
    logger.info("registered %s version %s from %s as %s", name, mv.version, model_uri, CHALLENGER)
    return client.get_model_version(name, str(mv.version))


def _finish_registration(client, mv: ModelVersion, description: str | None) -> None:
    name, version = mv.name, str(mv.version)
    status = client.get_model_version(name, version).status
    if status != "READY":
        raise RegistryError(f"model {name!r} version {version} is {status}, not READY")
    if description:
        client.update_model_version(name, version, description=description)
    _set_alias(client, name, CHALLENGER, version)
    client.set_model_version_tag(name, version, TAG_REGISTRATION, "complete")


def _set_alias(client, name: str, alias: str, version: str, attempts: int = 3) -> None:
    """``set_registered_model_alias``, retried: the SQL store upserts the alias as read-then-insert,
    so two registrations racing to create an alias that does not exist yet make one of them fail
    with a unique-key violation (seen with 8 parallel registrations against a PostgreSQL-backed
    server); on retry the alias exists and is updated. Last writer wins, as for any alias move."""
    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException as exc:
            if attempt == attempts - 1 or "unique" not in str(exc).lower():
                raise


def _undo_registration(client, name: str, mv: ModelVersion | None, reg_id: str) -> None:
    """Delete the version(s) this register call made (found by its registration id)."""
    versions = {str(mv.version)} if mv is not None else set()
    try:
        for v in _search_versions(client, name, f"tags.`{TAG_REGISTRATION_ID}` = '{reg_id}'"):
            versions.add(str(v.version))
    except Exception:  # noqa: BLE001 - best effort; the original error is what matters
        logger.warning("could not search for half-registered versions of %s", name, exc_info=True)
    for v in sorted(versions):
        _delete_version(client, name, v)


def _delete_version(client, name: str, version: str) -> None:
    try:
        client.delete_model_version(name, version)
        logger.warning("deleted half-registered model %s version %s", name, version)
    except Exception:  # noqa: BLE001
        logger.error("could not delete half-registered model %s version %s", name, version,
                     exc_info=True)


def _versions_for_run(client, name: str, run_id: str) -> list[ModelVersion]:
    found = _search_versions(client, name, f"tags.`{TAG_RUN_ID}` = {_quote(run_id)}")
    return sorted(found, key=lambda v: int(v.version))


# --------------------------------------------------------------------------------------------
# Promotion, rollback
# --------------------------------------------------------------------------------------------


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
    mv = _get_version(client, name, version)
    if mv.status != "READY":
        raise RegistryError(f"model {name!r} version {version} is {mv.status}, not READY")
    started = datetime.now(timezone.utc)
    attempt_key = _attempt_key(started)
    record: dict[str, Any] = {"at": _iso(started), "actor": actor,
                              "decision": None if decision is None else decision.promote}
    # serialise promotions of one model (a lock in the SQLite / PostgreSQL store); a tracking
    # server (http) has none: the alias is then read back after SETTLE_S and a lost race is
    # recorded as ``superseded``
    with locks.db_lock(mlflow.get_tracking_uri(), f"maas.promote:{name}", wait=True):
        return _promote_locked(client, name, version, mv, decision, actor, started,
                               attempt_key, record)


def _promote_locked(client, name, version, mv, decision, actor, started, attempt_key, record):
    current = _alias_version(client, name, CHAMPION)

    if decision is not None and not decision.promote:
        _set_tags(client, name, version, decision.to_tags())
        _set_tags(client, name, version, {attempt_key: _json(
            {**record, "outcome": "rejected", "champion": current, "reason": decision.reason})})
        logger.info("%s version %s not promoted: %s", name, version, decision.reason)
        return current

    if current == version:
        client.set_model_version_tag(name, version, attempt_key, _json(
            {**record, "outcome": "noop", "champion": current}))
        logger.info("%s version %s is already %s", name, version, CHAMPION)
        return current

    new_tags = {TAG_PROMOTED_AT: _iso(started), TAG_PROMOTED_BY: actor,
                TAG_PREVIOUS_CHAMPION: current or ""}
    if decision is not None:
        new_tags.update(decision.to_tags())
    before = {k: mv.tags.get(k) for k in new_tags}
    try:
        # Tags first: a champion must always carry its previous_champion, or rollback breaks.
        _set_tags(client, name, version, new_tags)
        client.set_registered_model_alias(name, CHAMPION, version)
    except BaseException as exc:
        _restore_tags(client, name, version, before)
        _try_set_tag(client, name, version, attempt_key, _json(
            {**record, "outcome": "failed", "champion": current, "error": repr(exc)[:500]}))
        raise

    actual = _alias_version(client, name, CHAMPION)
    if actual == version and not locks.supported(mlflow.get_tracking_uri()):
        # a tracking server offers no lock or compare-and-set on aliases: give a racing call
        # time to land its write, then look again (the last writer wins the alias)
        import time

        time.sleep(SETTLE_S)
        actual = _alias_version(client, name, CHAMPION)
    outcome = "promoted" if actual == version else "superseded"
    client.set_model_version_tag(name, version, attempt_key, _json(
        {**record, "outcome": outcome, "champion": actual, "previous": current,
         "reason": None if decision is None else decision.reason}))
    if outcome == "promoted":
        logger.info("%s: %s %s -> %s (by %s)", name, CHAMPION, current, version, actor)
    else:
        _try_set_tag(client, name, version, TAG_SUPERSEDED_BY, str(actual))
        logger.warning("%s: promoted version %s but %s is now %s (concurrent promotion)",
                       name, version, CHAMPION, actual)
    return actual



#: seconds a promotion through a tracking server waits before reading the alias back
SETTLE_S = 1.0


def rollback(name: str, *, actor: str = "manual") -> str:
    """Move ``champion`` back to the current champion's ``maas.previous_champion``.

    Repeated calls walk back the chain (v3 -> v2 -> v1). The rolled-back version gets
    ``maas.rolled_back_at`` / ``maas.rolled_back_to``; the restored one ``maas.restored_at`` and
    a ``maas.rollback.*`` record naming ``actor``.
    Raises :class:`RegistryError` (a ValueError) if there is no champion or no previous one.
    Returns the new champion version.
    """
    client = mlflow.MlflowClient()
    _get_model(client, name)
    current = champion(name)
    if current is None:
        raise RegistryError(f"model {name!r} has no {CHAMPION}; nothing to roll back")
    cur_v = str(current.version)
    previous = current.tags.get(TAG_PREVIOUS_CHAMPION, "")
    if not previous:
        raise RegistryError(f"model {name!r} {CHAMPION} version {cur_v} has no previous "
                            f"{CHAMPION} recorded; nothing to roll back to")
    try:
        _get_version(client, name, previous)
    except RegistryError as exc:
        raise RegistryError(f"cannot roll back {name!r} from version {cur_v}: previous "
                            f"{CHAMPION} version {previous} no longer exists") from exc
    now = _now_iso()
    client.set_registered_model_alias(name, CHAMPION, previous)
    _set_tags(client, name, cur_v, {TAG_ROLLED_BACK_AT: now, TAG_ROLLED_BACK_TO: previous})
    client.set_model_version_tag(name, previous, TAG_RESTORED_AT, now)
    _try_set_tag(client, name, previous,
                 _attempt_key(datetime.now(timezone.utc)).replace(TAG_ATTEMPT_PREFIX,
                                                                  TAG_ROLLBACK_PREFIX),
                 _json({"at": now, "actor": actor, "from": cur_v, "to": previous}))
    logger.warning("%s: rolled back %s from version %s to %s", name, CHAMPION, cur_v, previous)
    return previous


def champion(name: str) -> ModelVersion | None:
    """The version behind ``models:/NAME@champion``; None if the model or the alias is missing."""
    client = mlflow.MlflowClient()
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        # Missing model: RESOURCE_DOES_NOT_EXIST; missing alias: INVALID_PARAMETER_VALUE.
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


# --------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------


def describe(name: str) -> list[dict[str, Any]]:
    """One row per version of ``name``, newest first.

    Keys: ``version`` (str), ``aliases`` (list), ``status``, ``run_id`` (``maas.run_id`` or the
    version's run id), ``created_at`` (ISO UTC), ``source``, ``description``, ``metrics`` (from the
    ``maas.metric.<name>`` tags, floats), ``decision`` ("promote"/"reject"/None),
    ``decision_reason``, ``promoted_at``, ``promoted_by``, ``previous_champion``,
    ``rolled_back_at``, ``variant`` (the compression variant served, ``maas.variant``; "fp32"
    for versions registered without variants).
    """
    client = mlflow.MlflowClient()
    model = _get_model(client, name)
    aliases: dict[str, list[str]] = {}
    for alias, v in (model.aliases or {}).items():  # search results carry no aliases
        aliases.setdefault(str(v), []).append(alias)
    rows = []
    for mv in sorted(_search_versions(client, name), key=lambda v: -int(v.version)):
        tags = mv.tags or {}
        metrics: dict[str, Any] = {}
        for k, v in tags.items():
            if k.startswith(TAG_METRIC_PREFIX):
                try:
                    metrics[k[len(TAG_METRIC_PREFIX):]] = float(v)
                except ValueError:
                    metrics[k[len(TAG_METRIC_PREFIX):]] = v
        promote_tag = tags.get(TAG_DECISION_PREFIX + "promote")
        rows.append({
            "version": str(mv.version),
            "aliases": sorted(aliases.get(str(mv.version), []),
                              key=lambda a: (a != CHAMPION, a != CHALLENGER, a)),
            "status": mv.status,
            "run_id": tags.get(TAG_RUN_ID) or mv.run_id,
            "created_at": _iso(datetime.fromtimestamp(mv.creation_timestamp / 1000,
                                                      timezone.utc)),
            "source": mv.source,
            "description": mv.description or "",
            "metrics": dict(sorted(metrics.items())),
            "decision": None if promote_tag is None else
            ("promote" if promote_tag == "true" else "reject"),
            "decision_reason": tags.get(TAG_DECISION_PREFIX + "reason"),
            "promoted_at": tags.get(TAG_PROMOTED_AT),
            "promoted_by": tags.get(TAG_PROMOTED_BY),
            "previous_champion": tags.get(TAG_PREVIOUS_CHAMPION),
            "rolled_back_at": tags.get(TAG_ROLLED_BACK_AT),
            "variant": tags.get(TAG_VARIANT) or "fp32",
        })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table of ``describe`` rows, one column per metric."""
    if not rows:
        return "(no versions)"
    metric_names = sorted({m for r in rows for m in r.get("metrics", {})})
    header = ["version", "aliases", "created", "run", *metric_names, "variant", "decision",
              "reason"]
    table = [header]
    for r in rows:
        reason = r.get("decision_reason") or ""
        if len(reason) > 60:
            reason = reason[:57] + "..."
        metrics = r.get("metrics", {})
        table.append([
            str(r["version"]),
            ",".join(r.get("aliases", [])) or "-",
            (r.get("created_at") or "")[:19].replace("T", " "),
            (r.get("run_id") or "")[:8],
            *[_fmt_metric(metrics.get(m)) for m in metric_names],
            r.get("variant") or "fp32",
            r.get("decision") or "-",
            reason,
        ])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _get_model(client, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"unknown registered model {name!r}") from exc
        raise


def _get_version(client, name: str, version: str) -> ModelVersion:
    _get_model(client, name)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise RegistryError(f"model {name!r} has no version {version!r}") from exc
        raise


def _alias_version(client, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _search_versions(client, name: str, extra: str | None = None) -> list[ModelVersion]:
    filter_string = f"name = {_quote(name)}" + (f" AND {extra}" if extra else "")
    out: list[ModelVersion] = []
    token = None
    while True:
        page = client.search_model_versions(filter_string, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _set_tags(client, name: str, version: str, tags: dict[str, str]) -> None:
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)


def _restore_tags(client, name: str, version: str, before: dict[str, str | None]) -> None:
    for k, v in before.items():
        try:
            if v is None:
                client.delete_model_version_tag(name, version, k)
            else:
                client.set_model_version_tag(name, version, k, v)
        except Exception:  # noqa: BLE001 - best effort while another error propagates
            logger.debug("could not restore tag %s on %s/%s", k, name, version, exc_info=True)


def _try_set_tag(client, name: str, version: str, key: str, value: str) -> None:
    try:
        client.set_model_version_tag(name, version, key, value)
    except Exception:  # noqa: BLE001
        logger.debug("could not record %s on %s/%s", key, name, version, exc_info=True)


def _quote(value: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise RegistryError(f"cannot use {value!r} in a registry search (contains both quote kinds)")


def _attempt_key(at: datetime) -> str:
    return (f"{TAG_ATTEMPT_PREFIX}{at.strftime('%Y%m%dT%H%M%S.%fZ')}-{os.getpid()}"
            f"-{uuid.uuid4().hex[:6]}")


def _now_iso() -> str:
    return _iso(datetime.now(timezone.utc))


def _iso(at: datetime) -> str:
    return at.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _json(obj: dict[str, Any]) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _str(v: Any) -> str:
    return "" if v is None else str(v)


def _fmt_metric(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)
