"""The ``maas webhook`` commands: ``register`` (create/update a model's champion-alias webhook on
the tracking server) and ``serve`` (the receiver that rebuilds the bento when champion moves)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from pipelines.cli_common import EXIT_REGISTRY, _errors, _fail

log = logging.getLogger("maas")


@click.group("webhook")
def webhook() -> None:
    """Champion-alias webhooks: rebuild the bento whenever NAME@champion moves.

    \b
    maas webhook serve --port 8642            the receiver (secret from $MAAS_WEBHOOK_SECRET)
    maas webhook register NAME --url http://RECEIVER:8642/webhook
    Needs an MLflow tracking server (>= 3.3) with a SQL backend; see docs/webhooks.md.
    """


_SECRET_ENV = "MAAS_WEBHOOK_SECRET"


def _webhook_secret(secret_env: str, secret_file: Path | None) -> str:
    """The shared secret from ``--secret-file`` or ``$secret_env`` (never printed)."""
    from bentos.webhook_register import WebhookSetupError, check_secret
    from pipelines.config import ConfigError

    if secret_file is not None:
        source = f"--secret-file {secret_file}"
        try:
            secret = secret_file.read_text("utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{source}: {exc.strerror or exc}") from None
    else:
        source, secret = f"${secret_env}", os.environ.get(secret_env, "").strip()
    try:
        return check_secret(secret, source)
    except WebhookSetupError as exc:
        raise ConfigError(str(exc)) from None


def _secret_options(fn):
    fn = click.option("--secret-file", type=click.Path(path_type=Path, dir_okay=False),
                      help="Read the shared secret from this file instead.")(fn)
    return click.option("--secret-env", default=_SECRET_ENV, show_default=True, metavar="VAR",
                        help="Environment variable holding the shared HMAC secret.")(fn)


@webhook.command("register")
@click.argument("name")
@click.option("--url", required=True,
              help="The receiver's URL as the tracking server reaches it, e.g. "
                   "http://10.0.0.5:8642/webhook (?model=NAME is added).")
@_secret_options
@click.option("--no-test", is_flag=True, help="Skip MLflow's signed test delivery.")
@_errors
def webhook_register(name: str, url: str, secret_env: str, secret_file: Path | None,
                     no_test: bool) -> None:
    """Create (or update: never a duplicate) NAME's webhook for alias created/deleted events."""
    from bentos.webhook_register import WebhookSetupError, register_webhook, webhook_url
    from pipelines.config import ConfigError
    from pipelines.redact import redact

    secret = _webhook_secret(secret_env, secret_file)
    try:
        webhook_url(url, name)
    except WebhookSetupError as exc:
        raise ConfigError(str(exc)) from None
    try:
        r = register_webhook(name, url, secret, test=not no_test)
    except WebhookSetupError as exc:
        _fail(exc, EXIT_REGISTRY)
    click.echo(f"{'created' if r.created else 'updated'} webhook {r.name} ({r.webhook_id}) -> "
               f"{redact(r.url)}; events model_version_alias.created/deleted"
               + (f"; removed {r.removed_duplicates} duplicate(s)" if r.removed_duplicates
                  else ""))
    if r.test_ok:
        click.echo(f"test delivery: answered HTTP {r.test_status}")
    elif r.test_ok is False:
        click.echo(f"warning: test delivery failed (HTTP {r.test_status}): "
                   f"{redact(r.test_error or '')}; is `maas webhook serve` running there with "
                   "the same secret?", err=True)


@webhook.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8642, show_default=True, type=click.IntRange(1, 65535))
@_secret_options
@click.option("--window-s", default=300, show_default=True, type=click.IntRange(1, 86400),
              help="Accept deliveries whose timestamp is within this many seconds of now.")
@click.option("--model", "models", multiple=True, metavar="NAME",
              help="Only rebuild these models (repeatable; default: any model whose webhook "
                   "points here).")
@click.option("--set", "pairs", multiple=True, metavar="KEY=VALUE",
              help="A bento setting for the rebuilds (repeatable), e.g. --set quantize=true.")
@_errors
def webhook_serve(host: str, port: int, secret_env: str, secret_file: Path | None,
                  window_s: int, models: tuple[str, ...], pairs: tuple[str, ...]) -> None:
    """Receive MLflow alias webhooks; rebuild models:/NAME@champion when champion moves."""
    import mlflow

    from bentos import BentoSettings
    from bentos.webhook import serve
    from pipelines.config import ConfigError
    from pipelines.redact import redact

    secret = _webhook_secret(secret_env, secret_file)
    bad = [p for p in pairs if "=" not in p]
    if bad:
        raise ConfigError(f"--set {bad[0]!r}: expected KEY=VALUE (e.g. quantize=true)")
    try:
        settings = BentoSettings.from_mapping(dict(p.split("=", 1) for p in pairs))
    except ValueError as exc:
        raise ConfigError(f"--set: {exc}") from None
    log.info("webhook receiver: tracking %s, BentoML home %s",
             redact(mlflow.get_tracking_uri()), os.environ.get("BENTOML_HOME", "~/bentoml"))
    serve(secret, host=host, port=port, window_s=window_s, settings=settings,
          models=frozenset(models) or None)
