"""Create or update the MLflow registry webhook that tells ``bentos.webhook`` about a model's
alias moves (events ``model_version_alias.created`` / ``.deleted``).

MLflow webhooks are registry-wide (they carry every model's alias events) and exist only on a
SQL-backed registry; deliveries are sent by the tracking *server* (a client writing straight to
the database fires none). One webhook per model, named :func:`webhook_name`, with the model in
the URL's ``model`` query parameter so the receiver can drop the other models' events. The
server checks the URL: plain ``http`` needs ``MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https`` and a
loopback or private address needs ``MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true``, both in the
*server's* environment.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

logger = logging.getLogger(__name__)

EVENTS = ("model_version_alias.created", "model_version_alias.deleted")
MIN_SECRET_CHARS = 16
_NAME_MAX = 62  # MLflow: letters, digits, . _ -; alphanumeric ends; under 63 characters


class WebhookSetupError(ValueError):
    """The webhook could not be registered (wrong kind of store, URL refused, bad secret...)."""


@dataclass(frozen=True)
class Registered:
    """What :func:`register_webhook` did; ``test_*`` describe MLflow's test delivery (None when
    not tested)."""

    webhook_id: str
    name: str
    url: str
    created: bool
    removed_duplicates: int = 0
    test_ok: bool | None = None
    test_status: int | None = None
    test_error: str | None = None


def webhook_name(model_name: str) -> str:
    """A valid, stable MLflow webhook name for ``model_name`` (a hash suffix keeps names that had
    to be changed or cut unique)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip("._-") or "model"
    name = f"maas-champion-{base}"
    if base != model_name or len(name) > _NAME_MAX:
        digest = hashlib.sha256(model_name.encode("utf-8")).hexdigest()[:8]
        name = f"{name[:_NAME_MAX - 9].rstrip('._-')}-{digest}"
    return name


def webhook_url(url: str, model_name: str) -> str:
    """``url`` with ``model=<model_name>`` as its query parameter (replacing any)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookSetupError(f"--url {url!r}: expected http(s)://host[:port]/path")
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "model"]
    query.append(("model", model_name))
    return urlunsplit(parts._replace(query=urlencode(query)))


def check_secret(secret: str | None, source: str) -> str:
    if not secret or len(secret) < MIN_SECRET_CHARS:
        raise WebhookSetupError(f"{source}: the webhook secret must be at least "
                                f"{MIN_SECRET_CHARS} characters (e.g. `openssl rand -hex 32`)")
    return secret


def register_webhook(model_name: str, url: str, secret: str, *, test: bool = True) -> Registered:
    """Create the webhook of ``model_name`` on the tracking server of ``MLFLOW_TRACKING_URI``, or
    update it (URL, events, secret, ACTIVE) if it exists, removing duplicates of it. With
    ``test``, MLflow sends its signed example alias event to the receiver (which ignores it) and
    the outcome is returned."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        raise WebhookSetupError(
            "webhooks are delivered by an MLflow tracking server with a SQL backend; "
            "set MLFLOW_TRACKING_URI to that server (http(s)://host:port), not a local store")
    check_secret(secret, "secret")
    client = MlflowClient()
    name, full_url = webhook_name(model_name), webhook_url(url, model_name)
    description = f"MaaS: rebuild the bento when {model_name}@champion moves"
    try:
        mine = sorted((w for w in _all_webhooks(client) if w.name == name),
                      key=lambda w: w.creation_timestamp)
        if mine:
            hook = client.update_webhook(mine[0].webhook_id, url=full_url, events=list(EVENTS),
                                         secret=secret, status="ACTIVE",
                                         description=description)
            for extra in mine[1:]:
                client.delete_webhook(extra.webhook_id)
        else:
            hook = client.create_webhook(name=name, url=full_url, events=list(EVENTS),
                                         description=description, secret=secret)
    except MlflowException as exc:
        raise WebhookSetupError(_explain(str(exc))) from None
    result = Registered(hook.webhook_id, name, full_url, created=not mine,
                        removed_duplicates=max(0, len(mine) - 1))
    logger.info("%s webhook %s (%s) -> %s", "created" if not mine else "updated", name,
                hook.webhook_id, full_url)
    if not test:
        return result
    try:
        res = client.test_webhook(hook.webhook_id)
    except MlflowException as exc:
        return _with_test(result, False, None, str(exc)[:300])
    return _with_test(result, bool(res.success), res.response_status,
                      res.error_message or (None if res.success else (res.response_body or "")
                                            [:300]))


def _with_test(r: Registered, ok: bool, status: int | None, error: str | None) -> Registered:
    return Registered(r.webhook_id, r.name, r.url, r.created, r.removed_duplicates, ok, status,
                      error)


def _all_webhooks(client) -> list:
    out, token = [], None
    while True:
        page = client.list_webhooks(max_results=100, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _explain(message: str) -> str:
    low = message.lower()
    if "scheme" in low:
        hint = ("the tracking server accepts only https webhook URLs by default; start it with "
                "MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https to allow http")
    elif "public ip" in low or "private" in low or "resolve" in low:
        hint = ("the tracking server refuses webhook URLs on loopback/private addresses; start "
                "it with MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true (trusted networks only)")
    elif "not supported" in low or "not implemented" in low or "filestore" in low \
            or "endpoint" in low and "not found" in low:
        hint = "webhooks need a tracking server whose registry is SQL-backed (MLflow >= 3.3)"
    else:
        hint = "is the tracking server MLflow >= 3.3 with a SQL-backed registry?"
    return f"the tracking server refused the webhook: {message.strip()[:400]} ({hint})"
