"""The tag layout kept on registered model versions, and how tag keys and values are written.

Everything in ``registry`` goes through ``mlflow.MlflowClient()``, which honours
``MLFLOW_TRACKING_URI`` / ``mlflow.set_tracking_uri`` (the registry needs a database backend:
SQLite locally, PostgreSQL when scaled out). Model stages are deprecated in MLflow 3 and never
used here; the lifecycle is two aliases:

* ``challenger`` -- the most recently registered version, awaiting a decision;
* ``champion``   -- the version that is served (``models:/NAME@champion``).

MLflow keeps no history of alias moves, so the registry keeps its own on the model versions as
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
``maas.rollback.<ts>-<pid>-<r>``       one JSON record per ``rollback`` onto the version (at,
                                       actor, from, to); ``registry.alias_history`` reads these and
                                       the attempts
``maas.superseded_by``                 a concurrent promotion won the alias right after this one
``maas.variant`` / ``maas.variants``    the compression variant to serve and the variant table
                                       (JSON), set by the pipeline at registration
=====================================  ===========================================================

Who writes them: :mod:`registry.registration` (``register``), :mod:`registry.aliases`
(``promote`` / ``rollback``); :mod:`registry.queries` and :mod:`registry.alias_history` read them.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timezone
from typing import Any

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


def attempt_key(at: datetime) -> str:
    """``maas.promotion_attempt.<ts>-<pid>-<rand>``: sorts by time, unique per call."""
    return (f"{TAG_ATTEMPT_PREFIX}{at.strftime('%Y%m%dT%H%M%S.%fZ')}-{os.getpid()}"
            f"-{uuid.uuid4().hex[:6]}")


def now_iso() -> str:
    return iso(datetime.now(timezone.utc))


def iso(at: datetime) -> str:
    """ISO-8601 UTC to the second, with a ``Z``."""
    return at.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def as_json(obj: dict[str, Any]) -> str:
    """A JSON record as a tag value (sorted keys)."""
    return json.dumps(obj, sort_keys=True, default=str)


def as_str(v: Any) -> str:
    """A tag value: None -> ""."""
    return "" if v is None else str(v)
