"""Registration: make a model URI a new version with lineage tags and the ``challenger`` alias,
idempotent per run id, and undo a half-made version when registration fails.

Tag layout: :mod:`registry.tags`.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion

from registry.aliases import set_alias
from registry.tags import (
    CHALLENGER,
    TAG_MODEL_URI,
    TAG_REGISTERED_AT,
    TAG_REGISTRATION,
    TAG_REGISTRATION_ID,
    TAG_RUN_ID,
    as_str,
    now_iso,
)
from registry.versions import RegistryError, quote, search_versions

logger = logging.getLogger(__name__)

_AWAIT_READY_S = 300


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
            logger.info("model %s version %s already registered for run %s; reusing it",
                        name, existing[0].version, run_id)
            return _completed(client, name, existing[0], description)

    reg_id = uuid.uuid4().hex
    all_tags = _registration_tags(model_uri, run_id, tags, reg_id)
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
                return _completed(client, name, winner, description)
        _finish_registration(client, mv, description)
    except BaseException:
        _undo_registration(client, name, mv, reg_id)
        raise
    logger.info("registered %s version %s from %s as %s", name, mv.version, model_uri, CHALLENGER)
    return client.get_model_version(name, str(mv.version))


def _registration_tags(model_uri: str, run_id: str | None, tags: dict[str, Any] | None,
                       reg_id: str) -> dict[str, str]:
    """The caller's tags as strings plus the registration's own (``pending`` until finished)."""
    all_tags = {str(k): as_str(v) for k, v in (tags or {}).items()}
    all_tags.update({
        TAG_MODEL_URI: model_uri,
        TAG_REGISTERED_AT: now_iso(),
        TAG_REGISTRATION: "pending",
        TAG_REGISTRATION_ID: reg_id,
    })
    if run_id:
        all_tags[TAG_RUN_ID] = run_id
    return all_tags


def _completed(client, name: str, mv: ModelVersion, description: str | None) -> ModelVersion:
    """An existing version of the same run, finished if an earlier call left it pending."""
    if mv.tags.get(TAG_REGISTRATION) != "complete":
        _finish_registration(client, mv, description)
    return client.get_model_version(name, str(mv.version))


def _finish_registration(client, mv: ModelVersion, description: str | None) -> None:
    name, version = mv.name, str(mv.version)
    status = client.get_model_version(name, version).status
    if status != "READY":
        raise RegistryError(f"model {name!r} version {version} is {status}, not READY")
    if description:
        client.update_model_version(name, version, description=description)
    set_alias(client, name, CHALLENGER, version)
    client.set_model_version_tag(name, version, TAG_REGISTRATION, "complete")


def _undo_registration(client, name: str, mv: ModelVersion | None, reg_id: str) -> None:
    """Delete the version(s) this register call made (found by its registration id)."""
    versions = {str(mv.version)} if mv is not None else set()
    try:
        for v in search_versions(client, name, f"tags.`{TAG_REGISTRATION_ID}` = '{reg_id}'"):
            versions.add(str(v.version))
    except Exception:  # best effort; the original error is what matters
        logger.warning("could not search for half-registered versions of %s", name, exc_info=True)
    for v in sorted(versions):
        _delete_version(client, name, v)


def _delete_version(client, name: str, version: str) -> None:
    try:
        client.delete_model_version(name, version)
        logger.warning("deleted half-registered model %s version %s", name, version)
    except Exception:  # best effort
        logger.exception("could not delete half-registered model %s version %s", name, version)


def _versions_for_run(client, name: str, run_id: str) -> list[ModelVersion]:
    found = search_versions(client, name, f"tags.`{TAG_RUN_ID}` = {quote(run_id)}")
    return sorted(found, key=lambda v: int(v.version))
