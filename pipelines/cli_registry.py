"""The registry ``maas`` commands: ``promote``, ``rollback``, ``models`` (versions or champion
history), ``card`` (a version's model card) and ``build`` (a bento from NAME@ALIAS)."""

from __future__ import annotations

import os
import sys

import click

from pipelines.cli_common import EXIT_REGISTRY, _errors, _fail


@click.command("promote")
@click.argument("name")
@click.argument("version")
@_errors
def promote(name: str, version: str) -> None:
    """Make VERSION of model NAME the champion (recorded on the version, with the previous one)."""
    from registry import champion
    from registry import promote as do_promote

    do_promote(name, version, None, actor=f"manual:{os.environ.get('USER', 'unknown')}")
    now = champion(name)
    click.echo(f"{name}@champion = version {now.version if now else None}")


@click.command("rollback")
@click.argument("name")
@_errors
def rollback(name: str) -> None:
    """Move the champion alias of NAME back to the previous champion."""
    from registry import rollback as do_rollback

    version = do_rollback(name, actor=f"manual:{os.environ.get('USER', 'unknown')}")
    click.echo(f"{name}@champion = version {version} (rolled back)")


@click.command("models")
@click.argument("name")
@click.option("--history", "show_history", is_flag=True,
              help="List every move of the champion alias instead: when, who, from -> to, why.")
@_errors
def models(name: str, show_history: bool) -> None:
    """List the versions of NAME with aliases, test metrics and promotion decisions."""
    from registry import describe, format_history, format_table, history

    click.echo(format_history(history(name)) if show_history else format_table(describe(name)))


@click.command("card")
@click.argument("ref", metavar="NAME@ALIAS")
@click.option("--json", "as_json", is_flag=True, help="Print the card's JSON form instead.")
@_errors
def card(ref: str, as_json: bool) -> None:
    """Print the model card of a registered version: NAME@ALIAS or NAME/VERSION
    (e.g. `maas card sst2-sentiment@champion`), with its aliases, drift evidence and champion
    history as the registry has them now."""
    from registry import card_json, current_card

    name, version = _resolve_ref(ref)
    markdown, facts = current_card(name, version)
    if as_json:
        if facts is None:
            _fail(f"{ref}: version {version} has no JSON model card (registered outside "
                  "`maas run`); its description is printed without --json", EXIT_REGISTRY)
        click.echo(card_json(facts), nl=False)
    else:
        click.echo(markdown or f"(version {version} of {name} has no model card)")


def _resolve_ref(ref: str) -> tuple[str, str]:
    """NAME@ALIAS or NAME/VERSION -> (name, version); unknown ones are a RegistryError."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipelines.config import ConfigError
    from registry import RegistryError

    client = MlflowClient()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return name, str(client.get_model_version_by_alias(name, alias).version)
        if "/" in ref:
            name, version = ref.rsplit("/", 1)
            return name, str(client.get_model_version(name, version).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise RegistryError(f"{ref}: no such registered model version ({exc.message})"
                                ) from None
        raise
    raise ConfigError(f"{ref!r}: expected NAME@ALIAS (or NAME/VERSION)")


@click.command("build")
@click.argument("ref", metavar="NAME@ALIAS")
@click.option("--quantize", is_flag=True, help="Dynamic int8 quantisation (CPU deployments).")
@click.option("--max-batch-size", type=int, default=32, show_default=True)
@click.option("--max-latency-ms", type=int, default=5000, show_default=True)
@click.option("--variant", default=None, metavar="NAME",
              help="Compression variant to serve (fp32, onnx, onnx-int8, distilled, "
                   "distilled+onnx-int8, pruned, ...); default: the version's chosen one "
                   "(tag maas.variant).")
@_errors
def build(ref: str, quantize: bool, max_batch_size: int, max_latency_ms: int,
          variant: str | None) -> None:
    """Build a bento from a registry alias, e.g. `maas build sst2-sentiment@champion`."""
    from bentos import BentoSettings, build_bento
    from bentos.variants import VariantOutOfBudget
    from pipelines.config import ConfigError

    if "@" in ref:
        name, alias = ref.split("@", 1)
        uri = f"models:/{name}@{alias}"
    elif "/" in ref:
        uri = f"models:/{ref}"
    else:
        raise ConfigError(f"{ref!r}: expected NAME@ALIAS (or NAME/VERSION)")
    try:
        settings = BentoSettings.from_mapping({"quantize": quantize,  # errors name the setting
                                               "max_batch_size": max_batch_size,
                                               "max_latency_ms": max_latency_ms,
                                               "variant": variant})
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        built = build_bento(uri, settings)
    except VariantOutOfBudget as exc:  # a refusal recorded in the registry
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_REGISTRY)
    except ValueError as exc:  # unknown variant, bad variant entry, not a model version
        raise ConfigError(str(exc)) from None
    click.echo(f"bento {built.bento_tag} (model {built.model_name} v{built.model_version}, "
               f"variant {built.variant} on {built.runtime})\n"
               f"serve with: {built.serve_command}")
